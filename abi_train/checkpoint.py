"""Checkpoints: one folder per saved step, written to a temp folder and renamed into place.

    <run_dir>/checkpoints/step_00000100/
        model.safetensors   raw model weights (no pickle); a LoRA run writes adapter.safetensors instead: the
                            trained tensors only, meta.json naming the base (init_from and its content hash)
        meta.json           step, family, model_config (rebuilds the model via the builder registry), ...
        train_state.pt      optimizer, scheduler, scaler, counters (torch.load(weights_only=True))
        rng_rank<N>.pt      every RNG of process N (weights_only)
        tokenizer.json ...  the task's artifacts, so a checkpoint folder is self-contained
    <run_dir>/checkpoints/latest   text file naming the newest folder

Nothing here executes code named in a file: models come from abi_train.models.SPECS only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file as st_save_file
from safetensors.torch import save_model as st_save_model
from torch import nn

from abi_train import __version__
from abi_train.errors import UserError

PREFIX = "step_"
LATEST = "latest"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def temp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Create (empty) the temp folder a checkpoint is written into before its rename. Rank 0 only."""
    checkpoints_root(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = temp_checkpoint_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_weights(tmp: Path, model: nn.Module) -> None:
    st_save_model(model, str(tmp / "model.safetensors"))


def write_state_dict(tmp: Path, state: dict[str, torch.Tensor], filename: str = WEIGHTS) -> None:
    """model.safetensors (or ``filename``) from a (gathered) state dict, byte for byte what ``write_weights`` writes for
    the same weights: a tensor stored under several names (tied weights) is kept once, under its
    alphabetically first name, the others recorded in the metadata as safetensors' save_model does."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in state.items():
        by_tensor.setdefault(id(t), []).append(name)
    kept, aliases = {}, {}
    for names in by_tensor.values():
        keep, *others = sorted(names)
        kept[keep] = state[keep].contiguous()
        aliases.update({other: keep for other in others})
    st_save_file(kept, str(tmp / filename), metadata=aliases or None)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a full state dict: tied names that ``write_state_dict`` stored once come back."""
    with safe_open(str(path), framework="pt") as f:
        aliases = f.metadata() or {}
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    state |= {alias: state[kept] for alias, kept in aliases.items() if kept in state}
    return state


def finish_checkpoint(
    run_dir: Path,
    tmp: Path,
    step: int,
    meta: dict[str, Any],
    train_state: dict[str, Any],
    write_artifacts: Callable[[Path], None],
    keep_last: int,
) -> Path:
    """Write the rest of the checkpoint into ``tmp``, rename it into place, update latest, prune."""
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "abi_train_version": __version__}, indent=2))
    torch.save(train_state, tmp / "train_state.pt")
    write_artifacts(tmp)
    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoints_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    done = [p for p in list_checkpoints(run_dir) if (p / "meta.json").is_file()]
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run dir (its latest checkpoint). UserError when there is none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "meta.json").is_file() and ((path / WEIGHTS).is_file() or (path / ADAPTER).is_file()):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(
            f"no checkpoint found in {str(path)!r} (expected a run dir with checkpoints/ or a step_* folder)"
        )
    return found


def load_meta(ckpt_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(ckpt_dir) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {str(ckpt_dir)!r} has an unreadable meta.json: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"checkpoint {str(ckpt_dir)!r}: meta.json lacks a model_config")
    return meta


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors into ``model``, or a LoRA run's adapter.safetensors into the trainable tensors of
    a model that already holds the base and its LoRA layers; a shape or name mismatch is a UserError."""
    adapter = Path(ckpt_dir) / ADAPTER
    if adapter.is_file():
        state = read_state_dict(adapter)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != set(trainable) or any(state[n].shape != trainable[n].shape for n in state):
            raise UserError(f"checkpoint {str(ckpt_dir)!r}: its adapter does not fit this model's adapter options")
        with torch.no_grad():
            for name, tensor in state.items():
                trainable[name].copy_(tensor)
        return
    path = Path(ckpt_dir) / WEIGHTS
    try:
        st_load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except (RuntimeError, SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {str(ckpt_dir)!r} does not fit this model: {first}") from None


def load_train_state(ckpt_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(train_state, this rank's RNG state or None when the checkpoint came from fewer processes)."""
    state = torch.load(Path(ckpt_dir) / "train_state.pt", map_location="cpu", weights_only=True)
    rng_path = Path(ckpt_dir) / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    return state, rng
