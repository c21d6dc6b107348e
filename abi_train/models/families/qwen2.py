"""Qwen2 / Qwen2.5: Llama with biases on the q/k/v projections; llama.cpp rotates it NeoX-style (as we do)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families._common import (
    LLAMA_DEFAULTS,
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
)


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    if c.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window=true is not supported (abi_train attends to the full context)")
    return llama_config_from_hf(c, where)


def hf_config(cfg: Any) -> dict[str, Any]:
    return llama_hf_config(cfg, "Qwen2ForCausalLM", "qwen2") | {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layer,
    }


def refuses(cfg: Any, fmt: str) -> str | None:
    if fmt == "hf" and cfg.attention_bias:
        return "a qwen2-style model with attention_bias=true (an output bias) has no Qwen2ForCausalLM form"
    return None


FAMILY = llama_like(
    name="qwen2",
    defaults={**LLAMA_DEFAULTS, "qkv_bias": True},
    hf_architectures=("Qwen2ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    gguf_architecture="qwen2",
    refuses=refuses,
)
