"""Attention through ``torch.nn.attention.flex_attention`` for what SDPA can only take as a dense mask or not at
all: packed documents, sliding windows (a block-sparse ``BlockMask``: masked-out blocks are skipped, no
[T x T] mask is built) and soft-capped scores (a ``score_mod``, Gemma 2).

flex_attention is fast only compiled: the decoder uses it inside a ``torch.compile``d forward (the trainer's
``trainer.compile=true``, ``trainer.attention=auto|flex``) and keeps SDPA with a dense mask, or its own capped
math, in eager code (evaluation, generation, CPU runs), which computes the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def document_mask(
    batch: int,
    queries: int,
    keys: int,
    device: torch.device,
    window: int | None = None,
    segments: torch.Tensor | None = None,
) -> BlockMask:
    """The causal BlockMask of the last ``queries`` of ``keys`` positions, within ``window`` (itself included)
    and within each row's own segment (``segments`` (B, T), packed rows)."""
    offset = keys - queries

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        keep = kv <= q + offset
        if window is not None:
            keep = keep & (q + offset - kv < window)
        if segments is not None:
            keep = keep & (segments[b, q] == segments[b, kv])
        return keep

    return create_block_mask(allowed, batch if segments is not None else None, None, queries, keys, device=device)


def soft_cap(cap: float) -> Callable[..., torch.Tensor]:
    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor):
        return cap * torch.tanh(score / cap)

    return score_mod


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | None,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """(B, H, T, D) attention with ``block_mask`` (None: causal) and an optional soft-cap."""
    if block_mask is None:
        block_mask = document_mask(q.shape[0], q.shape[2], k.shape[2], q.device)
    return flex_attention(
        q,
        k,
        v,
        score_mod=soft_cap(softcap) if softcap is not None else None,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
