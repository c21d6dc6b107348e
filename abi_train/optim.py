"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math
import re

import torch
from omegaconf import DictConfig
from torch import nn

from abi_train.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")


BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def generic_layer_id(name: str, num_layers: int) -> int:
    """The layer of a parameter for layer-wise lr decay in a model without its own ``layer_id`` (the GPT):
    embeddings 0, ``blocks.i`` i + 1, everything after the blocks (final norm, head) num_layers + 1."""
    m = BLOCK_INDEX.search(name)
    if m:
        return int(m.group(1)) + 1
    return 0 if "embd" in name else num_layers + 1


def _layer_scale(model: nn.Module, name: str, layer_decay: float) -> float:
    """decay ** (num_layers + 1 - layer_id), as BEiT and timm's ``param_groups_layer_decay``; a model with
    several towers (CLIP) answers per tower through ``layer_id(name) -> (layer_id, num_layers)``."""
    if hasattr(model, "layer_id"):
        layer, num_layers = model.layer_id(name)
    else:
        num_layers = len(getattr(model, "blocks", ()))
        layer = generic_layer_id(name, num_layers)
    return layer_decay ** (num_layers + 1 - layer)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, layer_decay: float | None = None
) -> list[dict]:
    """Weight decay on weight matrices; none on norms, biases, embeddings (token, position, class)
    or scalars such as CLIP's logit scale.

    With ``layer_decay`` (and ``lr``) one group per (learning-rate scale, decay or not), each with its own
    ``lr`` = lr x scale, the full-lr group first (the trainer logs group 0's lr); the schedule then
    multiplies every group's own initial lr (LambdaLR keeps one base lr per group)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or id(p) in embedding_params or "embd" in name
        scale = 1.0 if layer_decay is None else _layer_scale(model, name, layer_decay)
        groups.setdefault((scale, no_decay), []).append(p)
    if layer_decay is None:
        return [
            {"params": groups.get((1.0, False), []), "weight_decay": weight_decay},
            {"params": groups.get((1.0, True), []), "weight_decay": 0.0},
        ]
    if lr is None:
        raise ValueError("layer_decay needs the base lr")
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * scale, "lr_scale": scale}
        for (scale, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    ]


def build_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise UserError(f"optim.name={cfg.name!r} is not known; valid: adamw")
    if cfg.lr <= 0:
        raise UserError(f"optim.lr={cfg.lr} must be positive")
    layer_decay = cfg.get("layer_decay")
    if layer_decay is not None and (
        isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1
    ):
        raise UserError(f"optim.layer_decay={layer_decay!r} is not valid; valid: null (off) or a number in (0, 1]")
    groups = param_groups(model, cfg.weight_decay, cfg.lr, layer_decay)
    if not any(g["params"] for g in groups):
        raise UserError("no parameter is left to train: every parameter is frozen (trainer.freeze, model.lock_*)")
    # The fused kernel everywhere: one launch for all parameters on GPUs, and on CPUs a vectorised loop
    # ~6x faster than PyTorch's CPU default (a Python loop over tensors); docs/PERF.md, CPU step.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_factor(step: int, cfg: DictConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of steps.
    decay_steps = max(1, int(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"optim.schedule={cfg.schedule!r} is not known; valid: {', '.join(SCHEDULES)}")
    if cfg.warmup_steps < 0:
        raise UserError(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
