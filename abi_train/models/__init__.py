"""Builder registry. Models are rebuilt only from this fixed table, never from a class path read
from a file, so loading a checkpoint or GGUF someone else made cannot run their code."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from torch import nn

from abi_train.errors import UserError

BUILDERS = {
    "gpt": "abi_train.models.gpt:build_gpt",
    "vit": "abi_train.models.vit:build_vit",
    "clip": "abi_train.models.clip:build_clip",
}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a model from plain kwargs; ``config["arch"]`` picks the builder."""
    kwargs = dict(config)
    arch = kwargs.pop("arch", None)
    if arch not in BUILDERS:
        raise UserError(f"unknown model arch {arch!r}; valid: {', '.join(sorted(BUILDERS))}")
    module, fn = BUILDERS[arch].split(":")
    return getattr(import_module(module), fn)(**kwargs)
