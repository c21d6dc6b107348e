"""Rebuild a PyTorch model from a GGUF file alone: metadata -> builder kwargs, tensors -> state dict.

The inverse of ``export_gguf`` (quantized tensors are dequantized to fp32), and the project's own
loader for evaluating or fine-tuning from GGUF. The model is rebuilt through the fixed builder
registry, so a crafted file can only pick among known architectures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import nn

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export.gguf_common import tokenizer_from_gguf
from abi_train.models import SPECS, build_model

# Large arrays that come back as the Tokenizer instead of in the metadata dict.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def read_gguf(path: str | Path) -> tuple[nn.Module, Tokenizer | None, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer or None, metadata key -> value)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"not a readable GGUF file: {path} ({e})") from None
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {
        t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    fam = _family_module(kv)
    config = fam.config_from_gguf(kv, tensors)
    model = build_model(config)
    state = fam.from_gguf(tensors, config)
    if hasattr(fam, "params_from_metadata"):  # parameters a family keeps as metadata (CLIP's logit scale)
        state |= fam.params_from_metadata(kv)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{path}: tensors do not fit the model its metadata describes ({first})") from None
    tokenizer = tokenizer_from_gguf(kv)
    metadata = {k: v for k, v in kv.items() if k not in _TOKENIZER_ARRAYS}
    return model.eval(), tokenizer, metadata


def _family_module(kv: dict[str, Any]) -> Any:
    """Our own files name their model's arch (older ones its task family); other producers' files are
    matched by general.architecture."""
    arch = kv.get("general.architecture")
    ours, family = kv.get("abi_train.arch"), kv.get("abi_train.family")
    for spec in SPECS.values():
        mod = spec.adapter("gguf")
        if ours == spec.arch or (ours is None and family == spec.task):
            return mod
        if ours is None and family is None and arch in mod.ARCHITECTURES:
            return mod
    raise UserError(f"GGUF architecture {arch!r} (family {family!r}) is not one abi_train can rebuild")
