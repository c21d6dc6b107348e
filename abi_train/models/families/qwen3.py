"""Qwen3 (dense): Llama with an RMSNorm over each head's queries and keys (before RoPE) and a head size apart from
the width (Qwen3-0.6B: 16 heads of 128 on d_model 1024); llama.cpp's qwen3 rotates NeoX-style, as we do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.models.families._common import (
    GGUF_BLOCK,
    GGUF_QK_NORM,
    HF_BLOCK,
    HF_QK_NORM,
    LLAMA_DEFAULTS,
    full_attention_only,
    gguf_bias_refusal,
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
    sliding_refusal,
)


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    full_attention_only(c, where)
    return llama_config_from_hf(c, where) | {"attention_bias": bool(c.get("attention_bias", False))}


def hf_config(cfg: Any) -> dict[str, Any]:
    return llama_hf_config(cfg, "Qwen3ForCausalLM", "qwen3") | {
        "attention_bias": cfg.attention_bias,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layer,
    }


def refuses(cfg: Any, fmt: str) -> str | None:
    return gguf_bias_refusal(cfg, fmt, "qwen3") or sliding_refusal(cfg)


FAMILY = llama_like(
    name="qwen3",
    defaults={**LLAMA_DEFAULTS, "qk_norm": True},
    hf_architectures=("Qwen3ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block={**HF_BLOCK, **HF_QK_NORM},
    gguf_architecture="qwen3",
    gguf_block={**GGUF_BLOCK, **GGUF_QK_NORM},
    refuses=refuses,
)
