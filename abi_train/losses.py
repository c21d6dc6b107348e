"""Contrastive losses for CLIP: symmetric InfoNCE and the SigLIP sigmoid loss.

Both follow open_clip's "local loss + gather with grad": every rank gathers the features of all
ranks *with* gradient, then scores only its own rows against all columns. So memory stays linear in
the local batch, and the numbers equal one big batch of the global size:

- the loss of rank r is the big-batch loss restricted to r's rows, normalised by the local batch;
  the mean over ranks is the big-batch loss;
- the backward of the gather sums, over ranks, the gradients that reach each rank's features, and
  DDP then averages parameter gradients over ranks; together that is exactly the big-batch gradient
  (no extra scaling needed).

A single process (no process group) runs the same code with ``gather`` = identity and rank 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient path to every rank."""
    if not _distributed():
        return x
    import torch.distributed.nn.functional as dist_fn  # here: absent from builds without distributed

    # PyTorch marks this autograd gather deprecated in favour of a private API; it is still the one
    # public function whose backward sums gradients across ranks on every backend (gloo and NCCL).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def _rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    return dist.get_rank() if _distributed() else 0


def clip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather = all_gather_with_grad,
    rank: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over image/text pairs; row i of ``img`` matches row i of ``txt``.

    img, txt: (B, D) L2-normalised local features. logit_scale: the multiplier (exp of the
    learned log-scale), as returned by ``CLIP.forward``. ``rank`` defaults to this process's rank.
    """
    all_img, all_txt = gather(img), gather(txt)
    labels = torch.arange(img.shape[0], device=img.device) + _rank(rank) * img.shape[0]
    logits_i2t = logit_scale * img @ all_txt.T  # (B, N): local images vs every caption
    logits_t2i = logit_scale * txt @ all_img.T  # (B, N): local captions vs every image
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    gather: Gather = all_gather_with_grad,
    rank: int | None = None,
) -> torch.Tensor:
    """SigLIP: an independent sigmoid per (image, caption) pair; +1 on matches, -1 elsewhere.

    Local images are scored against the captions of every rank. As in the SigLIP paper the sum over
    all pairs is divided by the number of images, here the local ones, so the mean over ranks is the
    paper's loss for the global batch.
    """
    all_txt = gather(txt)
    logits = logit_scale * img @ all_txt.T + logit_bias  # (B, N)
    signs = -torch.ones_like(logits)
    cols = torch.arange(img.shape[0], device=img.device) + _rank(rank) * img.shape[0]
    signs[torch.arange(img.shape[0], device=img.device), cols] = 1.0
    return -F.logsigmoid(signs * logits).sum() / img.shape[0]
