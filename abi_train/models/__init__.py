"""What each model architecture knows about itself, keyed by ``arch`` (the ``model.arch`` config key).

Models are rebuilt only from this fixed table, never from a class path read from a file, so loading a
checkpoint, a Hugging Face folder or a GGUF file someone else made cannot run their code. Export and
import look the adapters up here too, so any checkpoint of an architecture exports and generates the
same way, whatever objective trained it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from abi_train.errors import UserError


@runtime_checkable
class Model(Protocol):
    """What the trainer, the transforms (freeze, LoRA), FSDP2 and the exporters read of every model."""

    @property
    def config(self) -> dict[str, Any]:
        """Plain kwargs, ``arch`` included, that rebuild the model through ``build_model``."""
        ...

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The repeated transformer blocks (what FSDP2 shards one by one)."""
        ...

    def flops_per_item(self) -> float:
        """Training FLOPs per item (a token, an image, an image-text pair), for MFU."""
        ...

    def lora_targets(self) -> list[str]:
        """The LoRA targets (``q k v o gate up down``) its layers offer."""
        ...

    def freeze_groups(self) -> dict[str, list[str]]:
        """Named fnmatch patterns of parameters ``trainer.freeze`` accepts by name."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    builder: str  # "module:function" building the model from its config kwargs
    gguf: str  # module with the GGUF name map and hyperparameters (abi_train/export/gguf_*.py)
    hf: str  # module with the Hugging Face adapter (abi_train/hf/*.py)
    task: str  # the task that trains it from scratch (its data and objective)
    # "module:function" fitting pretrained weights to a model of other options (a new head, image size):
    # (state, source config, target config) -> (state, names the model keeps from its own init). None: none.
    adapt: str | None = None
    adaptable: frozenset[str] = frozenset()  # config keys ``adapt`` handles: init_from may differ there

    def adapter(self, kind: str) -> ModuleType:
        """The ``gguf`` or ``hf`` adapter module."""
        return import_module(getattr(self, kind))

    def adapt_weights(
        self, state: dict[str, Tensor], source: dict[str, Any], target: dict[str, Any]
    ) -> tuple[dict[str, Tensor], set[str]]:
        """Pretrained weights (``source`` config) for a model built from ``target``: see ``adapt``."""
        if self.adapt is None:
            return state, set()
        module, fn = self.adapt.split(":")
        return getattr(import_module(module), fn)(state, source, target)


SPECS = {
    "gpt": ModelSpec("gpt", "abi_train.models.gpt:build_gpt", "abi_train.export.gguf_llm", "abi_train.hf.llm", "llm"),
    "vit": ModelSpec(
        "vit",
        "abi_train.models.vit:build_vit",
        "abi_train.export.gguf_vit",
        "abi_train.hf.vit",
        "vit",
        adapt="abi_train.models.vit:adapt_state_dict",
        adaptable=frozenset({"num_classes", "image_size"}),
    ),
    "clip": ModelSpec(
        "clip",
        "abi_train.models.clip:build_clip",
        "abi_train.export.gguf_clip",
        "abi_train.hf.clip",
        "clip",
        adapt="abi_train.models.clip:adapt_state_dict",
        adaptable=frozenset({"image_size"}),
    ),
}


def model_spec(arch: str | None) -> ModelSpec:
    if arch not in SPECS:
        raise UserError(f"unknown model arch {arch!r}; valid: {', '.join(sorted(SPECS))}")
    return SPECS[arch]


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a model from plain kwargs; ``config["arch"]`` picks the builder. Every model is a ``Model``."""
    kwargs = dict(config)
    module, fn = model_spec(kwargs.pop("arch", None)).builder.split(":")
    return getattr(import_module(module), fn)(**kwargs)
