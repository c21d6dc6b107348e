"""Phi-3 / Phi-4-mini (Phi3ForCausalLM): Llama with q/k/v fused in one ``self_attn.qkv_proj`` (rows q | k | v)
and the MLP's gate and up in one ``mlp.gate_up_proj`` (rows gate | up). llama.cpp's ``phi3`` stores them the same
way: ``attn_qkv``, and ``ffn_up`` holding gate | up, which its fused SwiGLU splits (the first half through SiLU).
Both rotate halves (NeoX): no row permutation.

- Partial rotary (Phi-4-mini's ``partial_rotary_factor`` 0.75): our ``rope_dim`` = int(head_dim * factor), as
  transformers computes it; llama.cpp's ``rope.dimension_count``.
- LongRoPE (Phi-3-*-128k, Phi-4-mini: ``rope_scaling.type`` longrope, or the older su / yarn that transformers'
  Phi3Config reads as longrope) with ``original_max_position_embeddings``: ``layers.longrope_factors`` says which
  factor set our fixed table takes (the long one when ``context_length`` exceeds the original length).
- ``sliding_window`` (Phi-3-mini-4k: 2047) is computed on every layer, as transformers does; llama.cpp's phi3
  switches it off, so such a model is refused in GGUF. A window no shorter than the context (Phi-4-mini's 262144)
  changes nothing and is dropped on import.
- Dropouts (``resid_pdrop``, ``embd_pdrop``, ``attention_dropout``) only act in training; they are not read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families._common import (
    QKV,
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
)

GATE_UP = ("mlp.gate", "mlp.up")
OLD_LONGROPE = ("su", "yarn")  # transformers' Phi3Config reads these rope types as longrope


def _rope(c: Mapping[str, Any]) -> dict[str, Any]:
    params = c.get("rope_parameters") or c.get("rope_scaling")
    return params if isinstance(params, dict) else {}


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = _rope(c)
    if params.get("rope_type", params.get("type")) in OLD_LONGROPE:
        c = {**c, "rope_parameters": {**params, "rope_type": "longrope"}}
    cfg = llama_config_from_hf(c, where)
    factor = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor")) or 1.0)
    if not 0 < factor <= 1:
        raise UserError(f"{where}: partial_rotary_factor={factor} must be in (0, 1]")
    if int(cfg["head_dim"] * factor) != cfg["head_dim"]:
        cfg["rope_dim"] = int(cfg["head_dim"] * factor)
    window = c.get("sliding_window")
    if window and int(window) < cfg["context_length"]:  # a longer window never bites
        cfg["sliding_window"] = int(window)
    return cfg


def _partial_rotary_factor(cfg: Any) -> float:
    """rope_dim / head_dim, nudged up where transformers' int(head_dim * factor) would round it below rope_dim."""
    factor = cfg.rope_dim / cfg.head_dim
    return factor if int(cfg.head_dim * factor) == cfg.rope_dim else math.nextafter(factor, 2.0)


def hf_config(cfg: Any) -> dict[str, Any]:
    out = llama_hf_config(cfg, "Phi3ForCausalLM", "phi3")
    scaling = cfg.rope_scaling or {}
    factor = _partial_rotary_factor(cfg)
    if scaling.get("type") == "longrope":
        # transformers 4's Phi3Config takes type, short_factor, long_factor (and original_max_position_embeddings
        # beside them), as Phi-3's own files; 5 reads those too, or the whole set from rope_parameters
        extra = {k: scaling[k] for k in ("factor", "attention_factor") if k in scaling}
        out["rope_scaling"] = {"type": "longrope", "short_factor": scaling["short_factor"]}
        out["rope_scaling"] |= {"long_factor": scaling["long_factor"], **extra}
    out["rope_parameters"] |= {"partial_rotary_factor": factor}
    original = scaling.get("original_max_position_embeddings", cfg.context_length)
    sliding = "sliding" in cfg.layer_types
    return out | {
        "partial_rotary_factor": factor,
        "original_max_position_embeddings": original,
        "sliding_window": cfg.sliding_window if sliding else None,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        # Phi3Config's defaults (32000, ...) index past a small vocabulary; a tokenizer's ids replace these
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def refuses(cfg: Any, fmt: str) -> str | None:
    target = "Phi3ForCausalLM" if fmt == "hf" else "llama.cpp phi3"
    if cfg.attention_bias or cfg.qkv_bias:
        return f"a phi3-style model with attention biases has no {target} form (Phi-3 has no biases)"
    if fmt == "hf" and len(set(cfg.layer_types)) > 1:
        return "Phi3ForCausalLM slides its window on every layer: a phi3-style model mixing full and sliding layers"
    if fmt == "gguf" and "sliding" in cfg.layer_types and cfg.sliding_window < cfg.context_length:
        return (
            f"llama.cpp's phi3 switches sliding-window attention off: a model.sliding_window={cfg.sliding_window} "
            "model would not run as trained in GGUF; export it with --format hf"
        )
    if fmt == "gguf" and cfg.head_dim * cfg.n_head != cfg.d_model:
        return f"llama.cpp's phi3 needs head_dim * n_head = d_model; this model has {cfg.head_dim} * {cfg.n_head}"
    return None


FAMILY = llama_like(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block={
        "input_layernorm": ("norm1",),
        "self_attn.qkv_proj": QKV,
        "self_attn.o_proj": ("attn.proj",),
        "post_attention_layernorm": ("norm2",),
        "mlp.gate_up_proj": GATE_UP,
        "mlp.down_proj": ("mlp.down",),
    },
    gguf_architecture="phi3",
    gguf_block={
        "attn_norm": ("norm1",),
        "attn_qkv": QKV,
        "attn_output": ("attn.proj",),
        "ffn_norm": ("norm2",),
        "ffn_up": GATE_UP,
        "ffn_down": ("mlp.down",),
    },
    refuses=refuses,
)
