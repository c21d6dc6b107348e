"""Hugging Face model folders in and out: the file layer shared by every architecture's adapter.

Reading: ``config.json`` (or open_clip's ``open_clip_config.json``) plus the weights as
``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``: no pickled code runs). The folder's
architecture picks the adapter (``abi_train/hf/{llm,vit,clip}.py``), which turns names and config into
abi_train's.

An adapter module provides:

    READS: tuple[str, ...]                         HF ``architectures`` values (or "timm", "open_clip") it reads
    config_from_hf(folder) -> dict                 builder kwargs, "arch" included
    state_dict_from_hf(folder, config) -> dict     abi_train's state dict; an unknown tensor name is a UserError
    tokenizer_from_hf(folder) -> Tokenizer | None
    metadata_from_hf(folder, config) -> dict       what the task needs: class_names, image_mean/std, ...
    to_hf(model, meta, tokenizer) -> HFExport      for ``python -m abi_train.export RUN --format hf``

Writing: ``write_hf_folder`` writes config.json, the safetensors (``{"format": "pt"}`` metadata, sharded
past ``max_shard_bytes`` with an index), the tokenizer files and generation_config.json into a temp folder
beside the target, then renames it into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from abi_train.errors import UserError

CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"


@dataclass
class HFFolder:
    """A model folder on disk: its config and (read on demand) its tensors under their HF names."""

    path: Path
    config: dict[str, Any]

    @property
    def architecture(self) -> str:
        """The adapter key: ``architectures[0]``, or "timm" / "open_clip" for those libraries' folders."""
        raise NotImplementedError

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def json(self, name: str) -> dict[str, Any] | None:
        """Another JSON file of the folder (preprocessor_config.json, generation_config.json, ...) or None."""
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON: {p} ({e})") from None


@dataclass
class HFExport:
    """What an adapter's ``to_hf`` hands to ``write_hf_folder``."""

    config: dict[str, Any]  # config.json
    tensors: dict[str, torch.Tensor]  # HF names
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # other JSON files (preprocessor_config.json)


def open_hf_folder(path: Path) -> HFFolder:
    raise NotImplementedError


def load_hf_folder(path: Path):  # -> abi_train.weights.Pretrained
    raise NotImplementedError
