"""Rebuild a PyTorch model from a GGUF file alone: metadata -> builder kwargs, tensors -> state dict.

The inverse of ``export_gguf`` and the reader of other producers' files (llama.cpp's converter, any
quantizer): every tensor type gguf-py can dequantize comes back as fp32. ``load_gguf`` is the
``init_from=FILE.gguf`` source (the weights are dequantized only when training asks for them);
``read_gguf`` builds the model at once. The model is rebuilt through the fixed builder registry, so a
crafted file can only pick among known architectures.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from torch import nn

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export.gguf_common import tokenizer_from_gguf
from abi_train.models import SPECS, build_model
from abi_train.weights import Pretrained, load_pretrained_weights

# Large arrays that come back as the Tokenizer instead of in the metadata dict.
_TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
)


class GGUFTensors(Mapping[str, torch.Tensor]):
    """The file's tensors by GGUF name, each dequantized to fp32 (PyTorch layout) when it is read, so a
    quantized model is never held twice; ``shape(name)`` answers without dequantizing."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._tensors: dict[str, ReaderTensor] = {t.name: t for t in reader.tensors}
        self._path = path
        for t in self._tensors.values():  # fail on a type gguf-py cannot read now, not when training starts
            self._dequantize(t, t.data[:1])

    def _dequantize(self, t: ReaderTensor, data: np.ndarray) -> np.ndarray:
        try:
            return dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"{self._path}: tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot dequantize "
                "(F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants and the IQ types are read)"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._tensors[name].shape.tolist()))

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return torch.from_numpy(self._dequantize(t, t.data).astype(np.float32, copy=True)).reshape(self.shape(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _open(path: str | Path) -> tuple[Path, dict[str, Any], GGUFTensors]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise UserError(f"not a readable GGUF file: {path} ({e})") from None
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return path, kv, GGUFTensors(reader, path)


def _state(fam: Any, kv: dict[str, Any], tensors: Mapping[str, torch.Tensor], config: dict[str, Any]):
    state = fam.from_gguf(tensors, config)
    if hasattr(fam, "params_from_metadata"):  # parameters a family keeps as metadata (CLIP's logit scale)
        state |= fam.params_from_metadata(kv)
    return state


def load_gguf(path: str | Path) -> Pretrained:
    """A GGUF file as an ``init_from`` source: the model config and tokenizer now, the weights on demand."""
    return _pretrained(*_open(path))


def _pretrained(path: Path, kv: dict[str, Any], tensors: GGUFTensors) -> Pretrained:
    fam = _family_module(kv)
    config = fam.config_from_gguf(kv, tensors)
    tokenizer = tokenizer_from_gguf(kv, str(path)) if fam.NEEDS_TOKENIZER else None
    metadata = metadata_from_gguf(kv)
    return Pretrained("gguf", path, config, lambda: _state(fam, kv, tensors, config), tokenizer, metadata)


def metadata_from_gguf(kv: dict[str, Any]) -> dict[str, Any]:
    """What the file says about the model's inputs, under the names the tasks read (``Pretrained.metadata``):
    image normalisation (clip.vision.*, as clip.cpp reads it) and our class names."""
    out: dict[str, Any] = {}
    for key, name in (("clip.vision.image_mean", "image_mean"), ("clip.vision.image_std", "image_std")):
        if key in kv:
            out[name] = [float(x) for x in kv[key]]
    if "abi_train.class_names" in kv:
        out["class_names"] = [str(x) for x in kv["abi_train.class_names"]]
    return out


def read_gguf(path: str | Path) -> tuple[nn.Module, Tokenizer | None, dict[str, Any]]:
    """(model in eval mode on CPU, tokenizer or None, metadata key -> value)."""
    path, kv, tensors = _open(path)
    pretrained = _pretrained(path, kv, tensors)
    model = build_model(pretrained.model_config)
    load_pretrained_weights(model, pretrained)
    metadata = {k: v for k, v in kv.items() if k not in _TOKENIZER_ARRAYS}
    return model.eval(), pretrained.tokenizer, metadata


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
    supported = sorted({a for spec in SPECS.values() for a in spec.adapter("gguf").ARCHITECTURES})
    raise UserError(
        f"GGUF architecture {arch!r} is not one abi_train can rebuild; supported: {', '.join(supported)}"
        + (f" (abi_train family {family!r})" if family else "")
    )
