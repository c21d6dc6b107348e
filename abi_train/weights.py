"""Starting weights, whatever their source: the ``Pretrained`` every source gives (``sources.py`` decides which
source ``init_from`` names), the merge of its config with the run's, the copy into a model that names a
mismatched tensor in the source's own terms, and the fingerprint an adapter records of its base.

A ``Pretrained`` holds the model's config (its shape, which then comes from the source and not from the
``model`` group), the weights in abi_train's names (read on demand), the tokenizer and what the source says
about its inputs (class names, image normalisation). This module imports no source reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

# Model options that do not change the shape of the weights: the run's config keeps them. CLIP's tower
# locks (LiT) only decide what trains.
TUNABLE = frozenset({"dropout", "drop_path", "name", "lock_image", "lock_text"})


@dataclass
class Pretrained:
    kind: str  # "checkpoint" | "hf" | "gguf"
    path: Path
    model_config: dict[str, Any]  # builder kwargs, "arch" included
    load_weights: Callable[[], dict[str, torch.Tensor]]  # abi_train's names; read only when training starts
    tokenizer: Tokenizer | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # class_names, image_mean, image_std, ...
    hub_id: str | None = None  # init_from as typed, when it named a Hugging Face hub id (``path``: its snapshot)

    def describe(self) -> str:
        return f"{self.kind} {self.hub_id} ({self.path})" if self.hub_id else f"{self.kind} {self.path}"


def merge_model_config(
    source: dict[str, Any], requested: dict[str, Any], explicit: Iterable[str], origin: str
) -> dict[str, Any]:
    """The source's config (of the run's architecture: ``Task.use_pretrained`` checked it), with the run's
    TUNABLE options. An explicit override (``model.KEY=...`` on the command line) of a shape key that
    contradicts the source is a UserError, except for the keys the architecture's weights adapt to
    (``ModelSpec.adaptable``: a ViT's num_classes and image_size), which the override sets."""
    from abi_train.models import model_spec

    adaptable = model_spec(source.get("arch")).adaptable
    merged = dict(source)
    for key in TUNABLE & set(requested):
        if key != "name" or key in explicit:  # the source's own name unless the user names it
            merged[key] = requested[key]
    for key in adaptable & set(explicit) & set(requested):
        merged[key] = requested[key]
    conflicts = sorted(
        k
        for k in explicit
        if k not in TUNABLE | adaptable and k in requested and requested[k] != source.get(k, requested[k])
    )
    if conflicts:
        shown = ", ".join(f"model.{k}={requested[k]!r} (it has {source.get(k)!r})" for k in conflicts)
        raise UserError(f"{shown} contradicts init_from={origin}: the model's shape comes from it; drop the override")
    return merged


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the model ``config`` builds, from the meta device (no memory, no init)."""
    from abi_train.models import build_model

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}


def check_weights(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    source: str,
    origin: Mapping[str, str] | None = None,
) -> None:
    """Every expected tensor is there with its shape, and nothing else; an error names the tensor as the
    source calls it (``origin``: our name -> the source's)."""
    origin = origin or {}
    for name, t in state.items():
        if name not in expected:
            raise UserError(
                f"{source}: tensor {origin.get(name, name)!r} does not fit this model configuration "
                f"(it would be {name}, which the model does not have)"
            )
        if tuple(t.shape) != expected[name]:
            raise UserError(
                f"{source}: tensor {origin.get(name, name)!r} has shape {tuple(t.shape)}, "
                f"the config implies {expected[name]}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source}: the weights lack a tensor for {missing[0]} (of {len(missing)} missing)")


def load_pretrained_weights(model: nn.Module, pretrained: Pretrained) -> None:
    """Copy the source's weights into ``model`` (same names, same shapes); a mismatch names the tensor.
    The architecture's ``adapt`` hook first fits them to the model's options (a ViT: a new head, which
    keeps the model's init, and a resampled position embedding for a new image size)."""
    from abi_train.models import model_spec

    source, target = pretrained.model_config, model.config
    state, fresh = model_spec(target["arch"]).adapt_weights(pretrained.load_weights(), source, target)
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items() if k not in fresh}
    check_weights(state, expected, f"init_from={pretrained.path}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def model_overrides(overrides: Iterable[str]) -> frozenset[str]:
    """The ``model.*`` keys set on the command line (Hydra's task overrides, e.g. ``model.n_layer=3``);
    a ``model=NAME`` group choice counts as setting none (the shape of an init_from source wins)."""
    keys = set()
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.startswith("model."):
            keys.add(key.removeprefix("model.").split(".")[0])
    return frozenset(keys)


def fingerprint(path: str | Path) -> str:
    """sha256 of a source's weight files (a GGUF file; a folder's *.safetensors / *.bin / *.gguf in name
    order): what names the base of a LoRA adapter beside its path."""
    import hashlib

    path = Path(path)
    weight_files = (".safetensors", ".bin", ".gguf")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in weight_files)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def base_identity(pretrained: Pretrained) -> dict[str, str]:
    """What an adapter checkpoint records of its base: where it was read and its content hash."""
    # Absolute: the adapter is exported or resumed later, maybe from another working directory.
    return {"init_from": str(Path(pretrained.path).resolve()), "sha256": fingerprint(pretrained.path)}


def check_base(pretrained: Pretrained, base: dict[str, str], origin: str) -> None:
    """UserError unless ``pretrained`` is the base an adapter (``base``, from its checkpoint) was trained on."""
    if fingerprint(pretrained.path) != base["sha256"]:
        raise UserError(
            f"{origin} is a LoRA adapter of {base['init_from']} (sha256 {base['sha256'][:12]}), but "
            f"{pretrained.path} has different weights; use the base the adapter was trained on"
        )
