"""Hugging Face model folders in and out: the file layer shared by every architecture's adapter.

Reading: ``config.json`` (or open_clip's ``open_clip_config.json``) plus the weights as
``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``,
or ``pytorch_model.bin`` (and its sharded index; read with ``torch.load(weights_only=True)``: no pickled
code runs). open_clip's weights are ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``.
The folder's architecture (``HFFolder.architecture``) picks the adapter (``abi_train/hf/{llm,vit,clip}.py``)
through the table built from each adapter's ``READS``; the adapter turns names and config into abi_train's.

An adapter module provides:

    READS: tuple[str, ...]                         HF ``architectures`` values (or "timm", "open_clip") it reads
    config_from_hf(folder) -> dict                 builder kwargs, "arch" included
    state_dict_from_hf(folder, config) -> dict     abi_train's state dict; an unknown tensor name is a UserError
    tokenizer_from_hf(folder) -> Tokenizer | None
    metadata_from_hf(folder, config) -> dict       what the task needs: class_names, image_mean/std, ...
    to_hf(model, meta, tokenizer) -> HFExport      for ``python -m abi_train.export RUN --format hf``

Writing: ``write_hf_folder`` writes config.json, the safetensors (``{"format": "pt"}`` metadata, sharded
past ``max_shard_bytes`` with an index), the tokenizer files (``HFExport.tokenizer``) and the other JSON
files (``HFExport.files``: generation_config.json, preprocessor_config.json, ...) into a temp folder
beside the target, then renames it into place. ``export_hf`` does that for a checkpoint of any arch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from abi_train.errors import UserError

if TYPE_CHECKING:
    from abi_train.data.tokenizer import Tokenizer
    from abi_train.weights import Pretrained

CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"

# Weight files in the order they are looked for: (single file, sharded index).
WEIGHTS = {
    CONFIG: (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
    OPEN_CLIP_CONFIG: (("open_clip_model.safetensors", None), ("open_clip_pytorch_model.bin", None)),
}


@dataclass
class HFFolder:
    """A model folder on disk: its config and (read on demand) its tensors under their HF names."""

    path: Path
    config: dict[str, Any]
    config_name: str = CONFIG  # config.json, or open_clip_config.json
    weight_files: tuple[Path, ...] = ()  # the files ``tensors`` reads (shards in index order)

    @property
    def architecture(self) -> str:
        """The adapter key: ``architectures[0]``, or "timm" / "open_clip" for those libraries' folders."""
        if self.config_name == OPEN_CLIP_CONFIG:
            return "open_clip"
        if "architecture" in self.config and "architectures" not in self.config:
            return "timm"  # timm's hub config.json: {"architecture": "vit_base_patch16_224", ...}
        archs = self.config.get("architectures")
        if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
            raise UserError(
                f"{self.path / self.config_name} names no architecture (no 'architectures' list); "
                f"supported: {', '.join(supported_architectures())}"
            )
        return archs[0]

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the weight files under its HF name (on CPU, in the stored dtype)."""
        tensors: dict[str, torch.Tensor] = {}
        for f in self.weight_files:
            tensors |= _read_weights(f)
        return tensors

    def json(self, name: str) -> dict[str, Any] | None:
        """Another JSON file of the folder (preprocessor_config.json, generation_config.json, ...) or None."""
        p = self.path / name
        if not p.is_file():
            return None
        return _read_json(p)


@dataclass
class HFExport:
    """What an adapter's ``to_hf`` hands to ``write_hf_folder``."""

    config: dict[str, Any]  # config.json
    tensors: dict[str, torch.Tensor]  # HF names
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # other JSON files (generation_config.json)
    tokenizer: Tokenizer | None = None  # written as tokenizer.json + tokenizer_config.json


def _read_json(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {p} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} is not a JSON object")
    return data


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        try:
            return st_load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {f}: {e}") from None
    try:  # weights_only: tensors and plain containers only, no pickled code
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {f} as a weights-only state dict: {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{f} does not hold a state dict (name -> tensor)")
    return obj


def _weight_files(path: Path, config_name: str) -> tuple[Path, ...]:
    for single, index in WEIGHTS[config_name]:
        if index and (path / index).is_file():
            weight_map = _read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{path / index} has no weight_map")
            shards = tuple(dict.fromkeys(path / str(name) for name in weight_map.values()))
            for shard in shards:
                if not shard.is_file():
                    raise UserError(f"{path / index} names shard {shard.name}, which is missing from {path}")
            return shards
        if (path / single).is_file():
            return (path / single,)
    names = [n for pair in WEIGHTS[config_name] for n in pair if n]
    raise UserError(f"{path} has {config_name} but no weights: expected one of {', '.join(names)}")


def open_hf_folder(path: str | Path) -> HFFolder:
    """Check that PATH is a model folder (a config and its weights) and read its config."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a Hugging Face model folder (not a directory)")
    for name in (OPEN_CLIP_CONFIG, CONFIG):
        if (path / name).is_file():
            return HFFolder(path, _read_json(path / name), name, _weight_files(path, name))
    raise UserError(
        f"{str(path)!r} has no {CONFIG} (nor {OPEN_CLIP_CONFIG}): not a Hugging Face model folder, "
        "an abi_train run dir / checkpoint or a GGUF file"
    )


def architecture_table() -> dict[str, str]:
    """HF ``architectures`` value (or "timm" / "open_clip") -> abi_train arch, from each adapter's READS."""
    from importlib import import_module

    from abi_train.models import SPECS

    table: dict[str, str] = {}
    for arch, spec in SPECS.items():
        try:
            module = import_module(spec.hf)
        except ModuleNotFoundError as e:
            if e.name != spec.hf:
                raise
            continue  # that family has no HF adapter (yet)
        table |= dict.fromkeys(getattr(module, "READS", ()), arch)
    return table


def supported_architectures() -> list[str]:
    return sorted(architecture_table())


def load_hf_folder(path: str | Path) -> Pretrained:
    """A Hugging Face (or timm / open_clip) folder as a ``Pretrained``; weights are read when training starts."""
    from abi_train.models import SPECS
    from abi_train.weights import Pretrained

    folder = open_hf_folder(path)
    found = folder.architecture
    table = architecture_table()
    if found not in table:
        raise UserError(
            f"{folder.path / folder.config_name}: architecture {found!r} is not supported; "
            f"supported: {', '.join(sorted(table))}"
        )
    adapter = SPECS[table[found]].adapter("hf")
    config = adapter.config_from_hf(folder)

    def load_weights() -> dict[str, torch.Tensor]:
        try:
            return adapter.state_dict_from_hf(folder, config)
        finally:  # the Pretrained outlives the copy into the model: do not keep a second set of weights
            folder.__dict__.pop("tensors", None)

    return Pretrained(
        "hf",
        folder.path,
        config,
        load_weights,
        adapter.tokenizer_from_hf(folder),
        adapter.metadata_from_hf(folder, config),
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """ "5GB" -> 5 * 10**9, "500MiB" -> 500 * 2**20, plain numbers are bytes (as transformers' max_shard_size)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UserError(f"--max-shard-size={text!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = m.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(float(m.group(1)) * base ** " KMGT".index(unit[:1] or " "))
    if size <= 0:
        raise UserError(f"--max-shard-size={text!r} must be positive")
    return size


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in their order, split into groups of at most max_shard_bytes (a larger tensor goes alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def check_output_dir(out_dir: str | Path) -> Path:
    """The target of a folder export: new, or an empty directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {str(out)!r} already exists and is not an empty directory; pick a new path")
    return out


@contextlib.contextmanager
def new_folder(out_dir: str | Path) -> Iterator[Path]:
    """A temp folder beside ``out_dir`` (which must be new or empty) for the block to write into; renamed to
    ``out_dir`` when the block ends, so the folder appears whole; an error removes it."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_folder(export: HFExport, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``export`` as a model folder at ``out_dir`` (new or empty): all of it appears at once."""
    with new_folder(out_dir) as tmp:
        # safetensors refuses tensors sharing memory (tied weights): each is stored as its own copy.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in export.tensors.items()}
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            st_save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                st_save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map |= dict.fromkeys(shard, name)
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        for name, data in {CONFIG: export.config, **export.files}.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if export.tokenizer is not None:
            export.tokenizer.save(tmp / "tokenizer.json")
    return Path(out_dir).expanduser()
