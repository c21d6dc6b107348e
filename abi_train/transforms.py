"""What a run does to a model after building it and before training it: freeze parameters (``trainer.freeze``)
and add LoRA updates (``adapter=lora``, which freezes the rest). One ``apply`` does both, in that order; the
trainer, ``sources.load_model`` (a checkpoint rebuilt) and ``distributed.full_model`` (an FSDP2 model gathered
whole) all call it with the ``Transforms`` of the run, so a model is always rebuilt the way it trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from abi_train.lora import LoRAConfig, adapter_config, apply_lora, freeze


@dataclass(frozen=True)
class Transforms:
    freeze: tuple[str, ...] = ()  # fnmatch patterns or freeze groups of the model
    adapter: LoRAConfig | None = None

    @classmethod
    def of_run(cls, cfg: Any) -> Transforms:
        """From a run's config (``trainer.freeze``, the ``adapter`` group)."""
        return cls(tuple(cfg.trainer.get("freeze") or ()), adapter_config(cfg.get("adapter")))

    @classmethod
    def of_checkpoint(cls, meta: dict[str, Any]) -> Transforms:
        """From a checkpoint's meta.json (its run config and its ``adapter`` entry)."""
        patterns = ((meta.get("config") or {}).get("trainer") or {}).get("freeze") or ()
        adapter = meta.get("adapter")
        return cls(tuple(patterns), LoRAConfig.from_dict(adapter) if adapter else None)


def apply(model: nn.Module, transforms: Transforms) -> nn.Module:
    """Freeze, then add the adapter, in place; returns ``model``."""
    if transforms.freeze:
        freeze(model, list(transforms.freeze))
    if transforms.adapter is not None:
        apply_lora(model, transforms.adapter)
    return model
