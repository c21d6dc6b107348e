"""GGUF export: one entry point; the name map comes from the model's architecture (``models.SPECS[arch].gguf``,
see gguf_common for the module shape), so a checkpoint exports the same way whatever objective trained it."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from abi_train.checkpoint import load_meta, resolve_checkpoint
from abi_train.errors import UserError
from abi_train.export.gguf_common import add_general, add_tensors, check_outtype, gguf_file
from abi_train.hf import DEFAULT_MAX_SHARD_BYTES
from abi_train.lora import merged
from abi_train.models import model_spec

# gguf's writer logs its file plan (naming our temp file) at INFO: noise in a training log.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)


def gguf_adapter(model_config: dict[str, Any]) -> ModuleType:
    """The GGUF name-map module of a model config's architecture."""
    return model_spec(model_config.get("arch")).adapter("gguf")


def gguf_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as GGUF (its adapter's ``refusal``), or None."""
    fam = gguf_adapter(model.config)
    return fam.refusal(model) if hasattr(fam, "refusal") else None


def export_gguf(
    model: nn.Module,
    meta: dict[str, Any],
    tokenizer_path: str | Path | None,
    out_path: str | Path,
    outtype: str = "f16",
) -> Path:
    """Write ``model`` (raw, not DDP/compiled; LoRA layers merged) as a GGUF file; ``meta`` is a checkpoint's
    meta.json dict.

    The file appears only complete: it is written to ``<out>.tmp-<pid>`` beside it, then renamed.
    """
    outtype = check_outtype(outtype)
    model = merged(model)  # a LoRA model exports as its base with the adapter merged in
    fam = gguf_adapter(model.config)
    if fam.NEEDS_TOKENIZER and (tokenizer_path is None or not Path(tokenizer_path).is_file()):
        raise UserError(f"{meta['family']} GGUF export needs a tokenizer.json; not found: {tokenizer_path}")
    # abi_train.arch is the model's own arch, also when the caller's meta (not a checkpoint's) lacks model_config.
    meta = {**meta, "model_config": meta.get("model_config") or model.config}
    with gguf_file(out_path, fam.architecture(model)) as writer:
        add_general(writer, model.config.get("name") or meta["family"], meta, outtype)
        fam.add_metadata(writer, model, meta, Path(tokenizer_path) if tokenizer_path else None)
        add_tensors(writer, fam.to_gguf(model), outtype, fam.KEEP_F32, getattr(fam, "KEEP_F16", ()))
    return Path(out_path)


def export_checkpoint(path: str | Path, out_path: str | Path, outtype: str = "f16") -> Path:
    """Export a checkpoint folder (or a run dir's latest checkpoint) to GGUF."""
    outtype = check_outtype(outtype)
    from abi_train.sources import load_model  # here: importing sources reads this package's gguf_common

    ckpt = resolve_checkpoint(path)
    gguf_adapter(load_meta(ckpt)["model_config"])  # fail on an unknown architecture before loading weights
    model, meta = load_model(ckpt, device="cpu")
    return export_gguf(model, meta, ckpt / "tokenizer.json", out_path, outtype)


def export_hf(checkpoint_path: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Export a checkpoint (or a run dir's latest) as a Hugging Face folder, through its arch's ``to_hf``."""
    from abi_train.data.tokenizer import Tokenizer
    from abi_train.hf import check_output_dir, write_hf_folder
    from abi_train.sources import load_model

    check_output_dir(out_dir)  # before any weights are read
    ckpt = resolve_checkpoint(checkpoint_path)
    adapter = model_spec(load_meta(ckpt)["model_config"].get("arch")).adapter("hf")
    model, meta = load_model(ckpt, device="cpu")
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json") if (ckpt / "tokenizer.json").is_file() else None
    return write_hf_folder(adapter.to_hf(merged(model), meta, tokenizer), out_dir, max_shard_bytes)
