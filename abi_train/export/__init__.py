"""GGUF export: one entry point, one name-map module per family (see gguf_common for the module shape)."""

from __future__ import annotations

import logging
import os
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from gguf import GGUFWriter
from torch import nn

from abi_train.checkpoint import load_meta, load_model, resolve_checkpoint
from abi_train.errors import UserError
from abi_train.export.gguf_common import add_general, add_tensors, check_outtype

# family (meta.json "family") -> its name-map module.
FAMILIES = {
    "llm": "abi_train.export.gguf_llm",
    "vit": "abi_train.export.gguf_vit",
    "clip": "abi_train.export.gguf_clip",
}

# gguf's writer logs its file plan (naming our temp file) at INFO: noise in a training log.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)


def family_module(family: str | None) -> ModuleType:
    if family not in FAMILIES:
        raise UserError(f"cannot export family {family!r} to GGUF; supported: {', '.join(FAMILIES)}")
    return import_module(FAMILIES[family])


def export_gguf(
    model: nn.Module,
    meta: dict[str, Any],
    tokenizer_path: str | Path | None,
    out_path: str | Path,
    outtype: str = "f16",
) -> Path:
    """Write ``model`` (raw, not DDP/compiled) as a GGUF file; ``meta`` is a checkpoint's meta.json dict.

    The file appears only complete: it is written to ``<out>.tmp-<pid>`` beside it, then renamed.
    """
    outtype = check_outtype(outtype)
    fam = family_module(meta.get("family"))
    out = Path(out_path)
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise UserError(f"output path is a directory: {out}")
    if fam.NEEDS_TOKENIZER and (tokenizer_path is None or not Path(tokenizer_path).is_file()):
        raise UserError(f"{meta['family']} GGUF export needs a tokenizer.json; not found: {tokenizer_path}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, fam.architecture(model))
    try:
        add_general(writer, model.config.get("name") or meta["family"], meta, outtype)
        fam.add_metadata(writer, model, meta, Path(tokenizer_path) if tokenizer_path else None)
        add_tensors(writer, fam.to_gguf(model), outtype, fam.KEEP_F32, getattr(fam, "KEEP_F16", ()))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_checkpoint(path: str | Path, out_path: str | Path, outtype: str = "f16") -> Path:
    """Export a checkpoint folder (or a run dir's latest checkpoint) to GGUF."""
    outtype = check_outtype(outtype)
    ckpt = resolve_checkpoint(path)
    family_module(load_meta(ckpt).get("family"))  # fail on an unknown family before loading weights
    model, meta = load_model(ckpt, device="cpu")
    return export_gguf(model, meta, ckpt / "tokenizer.json", out_path, outtype)
