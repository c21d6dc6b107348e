"""A LoRA run's adapter as a PEFT adapter folder: ``PeftModel.from_pretrained(base, folder)`` in transformers.

    adapter_config.json          peft_type LORA, r, lora_alpha, use_rslora, target_modules (HF names), ...
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in) / .lora_B.weight (out, r)

PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), as we do, so r, alpha and rslora are
written as trained. Names follow the HF mapping of hf/llm.py (each LLM family's table) and hf/vit.py:

- LLMs: each adapted part (q k v o gate up down) is the HF module its family's table puts it in (Llama's
  q_proj ... down_proj; no RoPE permutation: both rotate halves). Where one HF module fuses several parts
  (GPT-2's Conv1D ``attn.c_attn``, with ``fan_in_fan_out``; Phi-3's ``qkv_proj`` and ``gate_up_proj``), they
  become one block-diagonal LoRA of rank n * r there (A = [A_q; A_k; A_v], B = blockdiag(B_q, B_k, B_v): the
  same update), given through PEFT's ``rank_pattern`` / ``alpha_pattern`` so that its scale stays ours.
- ViT (ViTForImageClassification): transformers 5's module names (``vit.layers.N.attention.q_proj``, ``mlp.fc1``;
  transformers 4 named them ``vit.encoder.layer.N.attention.attention.query``, which these files do not match).
- ``adapter.also_train`` (base tensors trained in full): PEFT's ``modules_to_save``, the HF modules holding
  them saved whole (``base_model.model.model.norm.weight``, a ViT's ``classifier``); a module both adapted and
  trained in full, a tied embedding / head, a bare parameter (a ViT's class token) are refused in one line, as
  are CLIP runs: export the merged model (``--format hf``).

The folder is written to a temp folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from abi_train.errors import UserError
from abi_train.export.gguf_lora import also_trained, require_adapter
from abi_train.hf import check_output_dir, new_folder
from abi_train.hf.llm import to_hf
from abi_train.lora import adapters_by_part, lora_layers, merged
from abi_train.models.families import families, family
from abi_train.models.qkv import QKV_PARTS, group_lora, our_module

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the transformers model as base_model.model
MERGED_HINT = "export the merged model with --format hf"
LLMS = ", ".join(sorted(families()))


# Our ViT's block modules -> transformers 5's ViTForImageClassification modules (inside vit.layers.N; PEFT sees
# modules, and transformers 5 renamed ViT's: encoder.layer.N.attention.attention.query is now layers.N.attention.q_proj,
# while its files keep the old tensor names). q/k/v by target.
VIT_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc": "mlp.fc1",
    "mlp.proj": "mlp.fc2",
}
VIT_TOP = {"head": "classifier", "post_ln": "vit.layernorm"}


def _style(model: nn.Module) -> str:
    """An LLM family's name (its HF names are in its family file) or ``vit``."""
    arch = model.config.get("arch")
    if arch == "gpt":
        return model.config["style"]
    if arch == "vit":
        return "vit"
    raise UserError(f"PEFT adapter export is for LLMs ({LLMS}) and ViT; this is a {arch} model: {MERGED_HINT}")


def _vit_module(layer: str, module: str, target: str) -> str:
    """The transformers ViT module that our LoRA ``target`` of ``blocks.<layer>.<module>`` adapts."""
    return f"vit.layers.{layer}.{f'attention.{target}_proj' if module == 'attn.qkv' else VIT_BLOCK[module]}"


def _hf_modules(model: nn.Module, style: str, module: str) -> list[str]:
    """The HF module(s) holding the tensors of one of our modules (``blocks.3.norm1``, ``norm_f``, ``head``)."""
    parts = module.split(".")
    if parts[0] == "blocks":
        inner = ".".join(parts[2:])
        if style == "vit":
            return [_vit_module(parts[1], inner, t) for t in ("qkv" if inner == "attn.qkv" else "-")]
        fam, gated = family(style), model.cfg.gated_mlp
        held = set(QKV_PARTS) if inner == "attn.qkv" else {inner}
        theirs = [t for t, ps in fam.hf_block.items() if held & {our_module(p, gated) for p in ps}]
        return [f"{fam.hf_layers}.{parts[1]}.{t}" for t in theirs]
    tops = VIT_TOP if style == "vit" else {ours: theirs for theirs, ours in family(style).hf_top.items()}
    if module not in tops:
        raise UserError(
            f"adapter.also_train trains {module or 'a top-level parameter'} (e.g. the class token or position "
            f"embedding), which PEFT's modules_to_save cannot hold: {MERGED_HINT}"
        )
    return [tops[module]]


def _modules_to_save(
    model: nn.Module, style: str, also_train: list[str], meta: dict[str, Any]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``adapter.also_train`` as PEFT's modules_to_save: the HF modules holding the tensors trained in full, and
    their whole state (PEFT replaces a module whole; its untrained tensors are the base's, as here)."""
    if not also_train:
        return [], {}
    lora_names = {name for name, _ in lora_layers(model)}
    ours = sorted({n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n})
    for module in ours:
        if module in lora_names:
            raise UserError(
                f"adapter.also_train={also_train} trains {module} in full, which also has a LoRA update; PEFT cannot "
                f"save both on one module: {MERGED_HINT}"
            )
        if model.config.get("tie_embeddings") and module in ("tok_embd", "lm_head"):
            raise UserError(
                f"adapter.also_train={also_train} trains the tied embedding / head, which PEFT's modules_to_save "
                f"would untie: {MERGED_HINT}"
            )
    names = [hf for module in ours for hf in _hf_modules(model, style, module)]
    if style == "vit":  # LayerNorms, linears and the head: the same tensors under the module's transformers 5 name
        fused = [m for m in ours if len(_hf_modules(model, style, m)) > 1]
        if fused:
            raise UserError(
                f"adapter.also_train={also_train} trains the fused {fused[0]}, which HF's ViT splits into q/k/v "
                f"modules; PEFT's modules_to_save cannot hold it from here: {MERGED_HINT}"
            )
        state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] in ours}
        hf_state = {
            f"{_hf_modules(model, style, k.rpartition('.')[0])[0]}.{k.rpartition('.')[2]}": v for k, v in state.items()
        }
    else:  # LLM files name modules as the models do; their export splits q/k/v and transposes GPT-2's Conv1D
        hf_state = to_hf(merged(model), meta, None).tensors
    tensors = {
        f"{PREFIX}{key}": t.detach().float().contiguous()
        for key, t in hf_state.items()
        if key.rpartition(".")[0] in names
    }
    return names, tensors


def _hf_adapters(model: nn.Module, style: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """HF module -> (A, B, n: how many of our adapters it fuses) of ``model``'s LoRA layers."""
    if style != "vit":
        fam = family(style)
        return group_lora(adapters_by_part(model), model.cfg, fam.hf_block, lambda i: f"{fam.hf_layers}.{i}.")
    out = {}
    for name, layer in lora_layers(model):
        _, index, *rest = name.split(".")
        for target in layer.slices:
            a, b = (t[target].detach().float().cpu() for t in (layer.lora_a, layer.lora_b))
            out[_vit_module(index, ".".join(rest), target)] = (a, b, 1)
    return out


def peft_adapter(model: nn.Module, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json's dict, adapter_model.safetensors' tensors) of ``model``'s LoRA layers."""
    style = _style(model)
    adapter = meta.get("adapter") or {}
    modules_to_save, tensors = _modules_to_save(model, style, also_trained(meta), meta)
    targets: set[str] = set()
    fused: dict[str, int] = {}  # HF target_modules entry -> how many of our adapters share it (a fused tensor)
    for hf, (a, b, n) in _hf_adapters(model, style).items():
        # PEFT matches target_modules by name suffix: the module path inside a layer (self_attn.q_proj,
        # mlp.c_proj) tells GPT-2's attn.c_proj and mlp.c_proj apart.
        entry = (
            hf.rsplit(".", 1)[-1] if style == "vit" else hf.removeprefix(f"{family(style).hf_layers}.").split(".", 1)[1]
        )
        targets.add(entry)
        if n > 1:
            fused[entry] = n
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    layers = [layer for _, layer in lora_layers(model)]
    rank, scale = (layers[0].rank, layers[0].scale) if layers else (None, None)
    if rank is None or scale is None:
        raise UserError("the model has no LoRA layers (it was trained without adapter=lora); export the model itself")
    rslora = bool(adapter.get("rslora", False))
    alpha = float(adapter.get("alpha", scale * (math.sqrt(rank) if rslora else rank)))
    # A fused entry's rank is n * r; its alpha keeps PEFT's alpha / rank (or / sqrt(rank)) equal to our scale.
    rank_pattern = {entry: n * rank for entry, n in fused.items()}
    alpha_pattern = {entry: scale * (math.sqrt(n * rank) if rslora else n * rank) for entry, n in fused.items()}
    base = (adapter.get("base") or {}).get("init_from")
    config = {
        "peft_type": "LORA",
        "task_type": None if style == "vit" else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(adapter.get("dropout", 0.0)),
        "use_rslora": rslora,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": style != "vit" and bool(family(style).hf_transposed),  # GPT-2's Conv1D: (in, out)
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors


def write_peft_folder(model: nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``model``'s adapter as a PEFT folder at ``out_dir`` (new or empty): all of it appears at once."""
    out = check_output_dir(out_dir)
    config, tensors = peft_adapter(model, meta)
    base = config["base_model_name_or_path"]
    if base and not (Path(base) / "config.json").is_file():
        log.warning(
            "the adapter's base %s is not a Hugging Face folder: load the adapter over its --format hf export "
            "(and set base_model_name_or_path in %s)",
            base,
            CONFIG_FILE,
        )
    with new_folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def export_peft(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """``python -m abi_train.export RUN -o DIR --format peft``: a LoRA checkpoint's adapter as a PEFT folder."""
    from abi_train.checkpoint import load_meta, resolve_checkpoint
    from abi_train.sources import load_model

    check_output_dir(out_dir)  # before any weights are read
    ckpt = resolve_checkpoint(checkpoint_path)
    meta = load_meta(ckpt)
    require_adapter(checkpoint_path, meta)
    arch = meta["model_config"].get("arch")
    if arch not in ("gpt", "vit"):
        raise UserError(f"PEFT adapter export is for LLMs ({LLMS}) and ViT; this is a {arch} model: {MERGED_HINT}")
    model, meta = load_model(ckpt, device="cpu")
    return write_peft_folder(model, meta, out_dir)
