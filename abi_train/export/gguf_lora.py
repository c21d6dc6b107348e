"""A LoRA run's adapter as a llama.cpp LoRA adapter GGUF (what llama.cpp's convert_lora_to_gguf.py writes).

llama.cpp applies it over the base model's GGUF (``llama-cli -m base.gguf --lora adapter.gguf``,
llama-cpp-python's ``lora_path``): ``general.type = adapter``, ``adapter.type = lora``, the base's
``general.architecture``, and per adapted base tensor ``<name>.lora_a`` (rank, in) and ``<name>.lora_b``
(out, rank), named as our base export names that tensor (export/gguf_llm.py).

- Scale: llama.cpp computes ``alpha / rank`` per tensor (rank = lora_b's columns), so ``adapter.lora.alpha``
  is written as our ``scale * rank``: plain LoRA, rsLoRA (alpha / sqrt(rank)) and any alpha come out right.
- Names: the family's GGUF table (``models.qkv.group_lora``). Where llama.cpp permutes Q/K rows for its RoPE
  (llama), q/k ``lora_b`` rows get the same permutation as W (permuting the rows of B permutes the rows of B A).
- A fused tensor (gpt2's and phi3's ``attn_qkv``, phi3's gate+up ``ffn_up``) gets its parts' adapters as one
  block-diagonal LoRA of rank n * rank (A = [A_q; A_k; A_v], B = blockdiag(B_q, B_k, B_v)): exactly the same
  update. Its B is multiplied by n, since llama.cpp divides by the larger rank.
- ``adapter.also_train`` tensors (trained in full) have no place in a llama.cpp adapter: refused, as are
  ViT / CLIP models (llama.cpp's adapters are for LLMs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFType, Keys
from torch import nn

from abi_train.errors import UserError
from abi_train.export.gguf_common import add_general, gguf_file
from abi_train.lora import adapters_by_part, lora_layers
from abi_train.models.families import family
from abi_train.models.qkv import group_lora, permute_rope, rope_heads

OUTTYPES = ("f32", "f16")
MERGED_HINT = "export the merged model (--format gguf or hf)"


def unexportable(model: nn.Module, meta: dict[str, Any]) -> str | None:
    """Why ``model``'s adapter has no llama.cpp form (None when it has one): for the trainer's end-of-run
    export, which can skip adapter.gguf with this line instead of failing after training."""
    arch = model.config.get("arch")
    if arch != "gpt":
        return f"llama.cpp LoRA adapters are for LLMs; this is a {arch} model: {MERGED_HINT}"
    reason = family(model.cfg.style).refusal(model.cfg, "gguf")
    if reason:
        return reason  # the base has no GGUF form for an adapter to go over
    also = also_trained(meta)
    if also:
        return (
            f"adapter.also_train={also} trained base tensors in full, which a llama.cpp LoRA adapter cannot "
            f"carry: {MERGED_HINT}"
        )
    return None


def also_trained(meta: dict[str, Any]) -> list[str]:
    """The run's ``adapter.also_train`` patterns (from its meta)."""
    return list((meta.get("adapter") or {}).get("also_train") or ())


def lora_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GGUF base tensor name -> (A, B) in llama.cpp's layout, B already scaled so that llama.cpp's
    ``(scale * rank) / rank_of_tensor * B A`` is our ``scale * B A``."""
    c = model.cfg
    fam = family(c.style)
    heads = rope_heads(c)

    def permuted(part: str, b: torch.Tensor) -> torch.Tensor:
        return permute_rope(b, heads[part]) if fam.gguf_permute_qk and part in heads else b

    grouped = group_lora(adapters_by_part(model), c, fam.gguf_block, lambda i: f"blk.{i}.", permuted)
    return {f"{name}.weight": (a, b * n) for name, (a, b, n) in grouped.items()}


def export_gguf_lora(model: nn.Module, meta: dict[str, Any], out_path: str | Path, outtype: str = "f32") -> Path:
    """Write the LoRA layers of ``model`` (raw, with its LoRA layers) as a llama.cpp LoRA adapter GGUF; ``meta``
    is the run's meta dict (its ``adapter`` entry names the base). Written to a temp file, then renamed."""
    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r} is not one a LoRA adapter is written in; valid: {', '.join(OUTTYPES)}")
    reason = unexportable(model, meta)
    if reason:
        raise UserError(reason)
    layers = list(lora_layers(model))
    if not layers:
        raise UserError("the model has no LoRA layers (it was trained without adapter=lora); export the model itself")
    tensors = lora_tensors(model)
    _, first = layers[0]
    alpha = first.scale * first.rank  # every layer of a run has the same scale and rank
    meta = {**meta, "model_config": meta.get("model_config") or model.config}
    with gguf_file(out_path, family(model.cfg.style).gguf_architecture) as writer:
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        add_general(writer, f"{model.config.get('name') or meta['family']}-lora", meta, outtype)
        base = (meta.get("adapter") or {}).get("base") or {}
        if base.get("init_from"):
            writer.add_string("abi_train.adapter.base", str(base["init_from"]))
            writer.add_string("abi_train.adapter.base_sha256", str(base.get("sha256", "")))
        dtype = np.float32 if outtype == "f32" else np.float16
        for name, (a, b) in tensors.items():
            writer.add_tensor(f"{name}.lora_a", a.contiguous().numpy().astype(dtype))
            writer.add_tensor(f"{name}.lora_b", b.contiguous().numpy().astype(dtype))
    return Path(out_path)


def export_checkpoint_lora(path: str | Path, out_path: str | Path, outtype: str = "f32") -> Path:
    """``python -m abi_train.export RUN --format gguf-lora``: a checkpoint's adapter as a llama.cpp adapter."""
    from abi_train.checkpoint import load_meta, resolve_checkpoint
    from abi_train.sources import load_model

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype} is not one a LoRA adapter is written in; valid: {', '.join(OUTTYPES)}")
    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    require_adapter(path, meta)
    out = Path(out_path)
    if not out.parent.is_dir():  # before the base is read
        raise UserError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise UserError(f"output path is a directory: {out}")
    if meta["model_config"].get("arch") != "gpt":
        raise UserError(
            f"llama.cpp LoRA adapters are for LLMs; this is a {meta['model_config'].get('arch')} model: {MERGED_HINT}"
        )
    model, meta = load_model(ckpt, device="cpu")
    return export_gguf_lora(model, meta, out, outtype)


def require_adapter(path: str | Path, meta: dict[str, Any]) -> None:
    """A one-line UserError when the checkpoint at ``path`` was trained without an adapter."""
    if not meta.get("adapter"):
        raise UserError(
            f"{path} has no adapter (it was trained without adapter=lora); export the model with --format gguf or hf"
        )
