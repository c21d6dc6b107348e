"""LoRA (Hu et al. 2021) and partial freezing: what the trainer does to a built model before training it.

``apply_lora`` freezes every weight of the model and adds, to each targeted linear layer, a trainable
low-rank update: ``y = W x + scale * B A dropout(x)`` with A (rank, in) random and B (out, rank) zero, so
the model computes exactly what it did at step 0. ``scale`` is alpha / rank (alpha / sqrt(rank) with
rsLoRA). The base weights keep their names (``blocks.0.attn.qkv.weight``), so a base checkpoint or
pretrained source loads into a LoRA model unchanged; the adapter adds ``<layer>.lora_a.<target>`` and
``<layer>.lora_b.<target>``.

Targets are the names users know from PEFT and torchtune, mapped onto the shared layers: ``q k v`` are
row slices of the fused ``attn.qkv`` (each its own A and B, as PEFT's separate q_proj/k_proj/v_proj),
``o`` is ``attn.proj``, ``gate up down`` the SwiGLU MLP; a GELU MLP's ``fc`` / ``proj`` answer to
``up`` / ``down``. The same holds for every family (GPT, the ViT and both CLIP towers share ``Block``).

``freeze`` turns off gradients for parameters matched by fnmatch patterns or by a group the model names
(``model.freeze_groups()``, e.g. a ViT's ``backbone``): a linear probe is ``trainer.freeze=[backbone]``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abi_train.errors import UserError
from abi_train.models.layers import LORA_TARGETS, MLP, Attention
from abi_train.models.qkv import LORA_PARTS

TARGETS = LORA_TARGETS
TARGET_GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": TARGETS}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    rslora: bool = False
    also_train: tuple[str, ...] = ()  # base parameters (fnmatch) trained in full beside the adapter

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"adapter.rank={self.rank} must be a positive integer")
        if self.alpha <= 0:
            raise UserError(f"adapter.alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise UserError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise UserError(f"adapter.targets is empty; choose from {', '.join(TARGETS)} or {', '.join(TARGET_GROUPS)}")
        for name in self.targets:
            if name not in TARGETS and name not in TARGET_GROUPS:
                raise UserError(
                    f"adapter.targets: {name!r} is not a LoRA target; valid: {' '.join(TARGETS)} "
                    f"or the groups {', '.join(TARGET_GROUPS)}"
                )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def target_names(self) -> tuple[str, ...]:
        """The targets with groups expanded, in TARGETS order."""
        wanted = {t for name in self.targets for t in TARGET_GROUPS.get(name, (name,))}
        return tuple(t for t in TARGETS if t in wanted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "lora",
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "rslora": self.rslora,
            "also_train": list(self.also_train),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        fields = {k: v for k, v in d.items() if k not in ("type", "base")}  # base: where, not how
        for key in ("targets", "also_train"):
            if key in fields:
                value = fields[key]
                fields[key] = (value,) if isinstance(value, str) else tuple(value or ())
        return cls(**fields)


ADAPTERS = ("none", "lora")


def adapter_config(cfg: Any) -> LoRAConfig | None:
    """The ``adapter`` config group as a LoRAConfig (None for ``adapter=none``)."""
    name = None if cfg is None else cfg.get("name")
    if name in (None, "none"):
        return None
    if name != "lora":
        raise UserError(f"adapter={name!r} is not known; valid: {', '.join(ADAPTERS)}")
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    known = set(LoRAConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown adapter key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return LoRAConfig.from_dict(options)


class LoRALinear(nn.Linear):
    """A linear layer with low-rank updates on slices of its output rows (``slices``: target -> (start, stop)).

    It holds the wrapped layer's own ``weight`` and ``bias`` (same Parameters, same names), so loading
    base weights, FSDP sharding and the optimizer see the base as before, frozen.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], rank: int, scale: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices, self.rank, self.scale = dict(slices), rank, scale
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype)) for n in slices}
        )
        self.lora_b = nn.ParameterDict(
            {
                n: nn.Parameter(torch.zeros(stop - start, rank, device=device, dtype=dtype))
                for n, (start, stop) in slices.items()
            }
        )
        for a in self.lora_a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init of A; B stays zero
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        if len(self.slices) == 1 and next(iter(self.slices.values())) == (0, self.out_features):
            (name,) = self.slices
            return y + self.scale * F.linear(F.linear(h, self.lora_a[name]), self.lora_b[name])
        # Several row slices (q, k, v of the fused qkv): one matmul with the A's stacked, one with the B's as a
        # block diagonal (zero rows where no slice is), not two per slice: the step is launch-bound at small
        # widths (a LoRA step of the SmolLM2-135M shape spent a third of its time launching kernels, PERF.md).
        names = sorted(self.slices, key=self.slices.get)
        a = torch.cat([self.lora_a[n] for n in names])
        blocks, row = [], 0
        for n in names:
            start, stop = self.slices[n]
            if start > row:
                blocks.append(self.weight.new_zeros(start - row, 0))
            blocks.append(self.lora_b[n])
            row = stop
        if row < self.out_features:
            blocks.append(self.weight.new_zeros(self.out_features - row, 0))
        return y + self.scale * F.linear(F.linear(h, a), torch.block_diag(*blocks))

    def delta_weight(self) -> torch.Tensor:
        """scale * B A on each slice's rows, zeros elsewhere: what merging adds to ``weight``."""
        delta = torch.zeros_like(self.weight, dtype=torch.float32)
        for name, (start, stop) in self.slices.items():
            delta[start:stop] = self.lora_b[name].float() @ self.lora_a[name].float()
        return self.scale * delta

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing W + scale * B A (no adapter)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze ``model`` and add LoRA updates to the targeted layers, in place; returns the adapted layers'
    names. A target the model lacks (e.g. ``gate`` on GPT-2) is a UserError listing the ones it has."""
    wanted = cfg.target_names()
    have = model.lora_targets()
    missing = [t for t in cfg.targets if t in TARGETS and t not in have]  # groups take what the model has
    if missing:
        raise UserError(
            f"adapter.targets: {' '.join(missing)} matches no layer of this model; it has: {' '.join(have)} "
            f"(or the groups {', '.join(TARGET_GROUPS)})"
        )
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        by_child: dict[str, dict[str, tuple[int, int]]] = {}
        offered = module.lora_slices() if isinstance(module, (Attention, MLP)) else {}
        for target, (child, rows) in offered.items():
            if target in wanted:
                by_child.setdefault(child, {}).update(rows)
        for child, slices in by_child.items():
            setattr(module, child, LoRALinear(getattr(module, child), slices, cfg.rank, cfg.scale, cfg.dropout))
            adapted.append(f"{name}.{child}" if name else child)
    if not adapted:
        raise UserError(f"adapter.targets={list(cfg.targets)} matches no layer of this model; it has: {' '.join(have)}")
    if cfg.also_train:
        set_trainable(model, cfg.also_train, "adapter.also_train", True)
    return adapted


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapters_by_part(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every LoRA update of a decoder as ``blocks.N.<part>`` -> (A, B) in fp32 on the CPU, parts as ``models.qkv`` names
    them (``attn.q``, ``attn.proj``, ``mlp.up``, ...): what the PEFT and llama.cpp adapter exports regroup."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in lora_layers(model):
        parts = name.split(".")
        if parts[0] != "blocks":
            raise UserError(f"LoRA layer {name!r} is outside the blocks; adapter formats have no name for it")
        for target in layer.slices:
            a, b = (
                t[target].detach().float().cpu() for t in (layer.lora_a, layer.lora_b)
            )  # files are written from host memory
            out[f"blocks.{parts[1]}.{LORA_PARTS[target]}"] = (a, b)
    return out


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def merged(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no LoRA layer, else a copy with every LoRA layer merged into a plain
    linear: the shape and names of the base model, for export."""
    if not has_lora(model):
        return model
    out = copy.deepcopy(model)
    for name, layer in list(lora_layers(out)):
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, layer.merged())
    return out


def trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (``model``'s full state dict) that training changes: what an adapter
    checkpoint holds."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def _group_patterns(model: nn.Module, item: str) -> list[str]:
    groups = model.freeze_groups() if hasattr(model, "freeze_groups") else {}
    return list(groups.get(item, [item]))


def set_trainable(model: nn.Module, patterns: Sequence[str], key: str, trainable: bool) -> list[str]:
    """Set requires_grad of the parameters matched by ``patterns`` (fnmatch on names, or a group of
    ``model.freeze_groups()``); a pattern that matches nothing is a UserError naming ``key``."""
    params = dict(model.named_parameters())
    touched = []
    for item in patterns:
        matched = [n for n in params if any(fnmatch.fnmatchcase(n, p) for p in _group_patterns(model, item))]
        if not matched:
            groups = sorted(model.freeze_groups()) if hasattr(model, "freeze_groups") else []
            examples = ", ".join(list(params)[:4])
            raise UserError(
                f"{key}: {item!r} matches no parameter; give fnmatch patterns of parameter names (e.g. {examples})"
                + (f" or a group: {', '.join(groups)}" if groups else "")
            )
        for n in matched:
            params[n].requires_grad_(trainable)
        touched += matched
    return touched


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """``trainer.freeze``: turn gradients off for the matched parameters; UserError when nothing is left."""
    frozen = set_trainable(model, patterns, "trainer.freeze", False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"trainer.freeze={list(patterns)} freezes every parameter; nothing is left to train")
    return frozen
