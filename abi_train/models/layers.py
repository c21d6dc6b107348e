"""Building blocks shared by every model family: norms, RoPE, attention, MLP, the pre-norm block.

GPT-2, LLaMA, the ViT and both CLIP towers are all stacks of the same pre-norm ``Block``; the
families differ only in the options below (norm, MLP kind, biases, causal mask, RoPE, GQA).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_KERNELS = {
    "auto": None,  # PyTorch picks per call
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight follows x (bf16 under trainer.bf16_residual): mixed dtypes miss the fused kernel.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """LayerNorm (with a bias unless ``bias`` is false) or RMSNorm (never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


ROPE_SCALINGS = ("linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The head_dim/2 RoPE inverse frequencies, with Hugging Face's ``rope_scaling`` applied:
    ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+) divides the low frequencies
    by ``factor``, keeps the high ones and interpolates between (``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("type")
    if kind is None:
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unknown rope scaling {kind!r}; valid: {', '.join(ROPE_SCALINGS)}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cache(
    seq_len: int, head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """cos/sin table of shape (2, seq_len, head_dim) for the rotate-half (HF/NeoX) RoPE convention.

    llama.cpp's ``llama`` architecture rotates adjacent pairs instead; the GGUF exporter permutes the
    Q and K rows per head so both conventions compute the same attention.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling).to(device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by the first T positions of ``cache`` (2, T', D), or by a table
    already taken at each token's own position (2, B, 1, T, D; packed sequences, see ``rope_at``)."""
    if cache.ndim == 5:
        cos, sin = cache[0].to(x.dtype), cache[1].to(x.dtype)
    else:
        cos, sin = cache[0, : x.shape[-2]].to(x.dtype), cache[1, : x.shape[-2]].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_at(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The cos/sin table (2, T', D) taken at ``positions`` (B, T): (2, B, 1, T, D), broadcast over heads."""
    return cache[:, positions].unsqueeze(2)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) attention mask of packed rows: a token sees the earlier tokens (and itself) of its
    own segment only. ``segments`` (B, T) holds one id per packed sequence (padding: an id of its own)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)


class KVCache:
    """One attention layer's keys and values of every position seen so far, for incremental decoding: a prompt
    fills it at once, then each new token attends to all of it."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection; grouped-query when n_kv_head < n_head.

    ``head_dim`` defaults to d_model / n_head (some models set it apart, e.g. Gemma); ``qkv_bias`` and
    ``proj_bias`` default to ``bias`` (Qwen2 has biases on q/k/v only).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int | None = None,
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
    ) -> None:
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if (head_dim is None and d_model % n_head) or n_head % n_kv_head:
            raise ValueError(f"d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head} do not divide")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim or d_model // n_head
        self.causal, self.dropout = causal, dropout
        self.kernels: list[SDPBackend] | None = None  # None: PyTorch picks; see pin_attention_kernel
        # Rows: [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias if proj_bias is None else proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask`` (boolean, broadcast to (B, H, T, T), True = attend; e.g. ``segment_mask``) replaces the
        causal mask; ``rope`` is then usually the per-token table of ``rope_at``."""
        start = 0 if cache is None else cache.length  # positions already in the cache
        if start and x.shape[1] > 1 and self.causal:
            raise ValueError("a filled KV cache is extended one token at a time")
        if mask is not None and cache is not None:
            raise ValueError("an attention mask is for whole (packed) sequences, not for KV-cached decoding")
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        # Heads out of the feature dim, in front of time: SDPA's (B, H, T, D). einops compiles to the same
        # view + transpose (no graph break); in eager mode it adds ~8 us per call on the host.
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", d=self.head_dim) for t in (q, k, v))
        if rope is not None:
            table = rope if rope.ndim == 5 else rope[:, start:]
            q, k = apply_rope(q, table), apply_rope(k, table)
        if cache is not None:
            k, v = cache.extend(k, v)
        # The pin sits inside forward so torch.compile traces it (a context around the compiled call is not
        # seen by the graph).
        with sdpa_kernel(self.kernels) if self.kernels else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=self.causal and not start and mask is None,  # one new token sees every cached position
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


MLP_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")


class MLP(nn.Module):
    """GELU MLP (``fc`` -> GELU -> ``proj``) or SwiGLU (``down(silu(gate(x)) * up(x))``).

    GELU comes exact (``gelu``), in the tanh form (``gelu_tanh``, GPT-2) or as OpenAI CLIP's
    ``quick_gelu``, x * sigmoid(1.702 x)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown mlp {kind!r}; valid: {', '.join(MLP_KINDS)}")
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(d_model, hidden, bias=bias)
            self.up = nn.Linear(d_model, hidden, bias=bias)
            self.down = nn.Linear(hidden, d_model, bias=bias)
        else:
            self.fc = nn.Linear(d_model, hidden, bias=bias)
            self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.fc(x)
        if self.kind == "quick_gelu":
            return self.proj(h * torch.sigmoid(1.702 * h))
        return self.proj(F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        ffn_hidden: int,
        n_kv_head: int | None = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        mlp: str = "gelu",
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
        mlp_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        self.attn = Attention(
            d_model, n_head, n_kv_head, bias, causal, dropout, head_dim=head_dim, qkv_bias=qkv_bias, proj_bias=proj_bias
        )
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        self.mlp = MLP(d_model, ffn_hidden, kind=mlp, bias=bias if mlp_bias is None else mlp_bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.resid_dropout(self.attn(self.norm1(x), rope, cache, mask)))
        return x + self.drop_path(self.resid_dropout(self.mlp(self.norm2(x))))


def pin_attention_kernel(model: nn.Module, kind: str) -> None:
    """Pin every attention layer of ``model`` to one SDPA kernel (a key of ATTENTION_KERNELS)."""
    backend = ATTENTION_KERNELS[kind]
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernels = None if backend is None else [backend]
