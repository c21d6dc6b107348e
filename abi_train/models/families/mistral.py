"""Mistral (7B v0.1-v0.3, Nemo): Llama with no biases and, in v0.1, a sliding window on every layer (4096; v0.2+
null). llama.cpp converts Mistral to its ``llama`` architecture, which has no window: a model whose window is
shorter than its context has no GGUF form. Our GGUF files carry ``abi_train.style``, so they come back as mistral."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.models.families._common import (
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
)

HF_DEFAULT_WINDOW = 4096  # MistralConfig's sliding_window when config.json leaves the key out


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    window = c.get("sliding_window", HF_DEFAULT_WINDOW)
    return llama_config_from_hf(c, where) | {"sliding_window": None if window is None else int(window)}


def hf_config(cfg: Any) -> dict[str, Any]:
    return llama_hf_config(cfg, "MistralForCausalLM", "mistral") | {
        "sliding_window": cfg.sliding_window if "sliding" in cfg.layer_types else None
    }


def refuses(cfg: Any, fmt: str) -> str | None:
    if cfg.attention_bias or cfg.qkv_bias:
        return "a mistral-style model with attention biases has no Mistral form (use style=llama or qwen2)"
    if fmt == "hf" and len(set(cfg.layer_types)) > 1:
        return f"MistralForCausalLM has one attention pattern for every layer; layer_types={cfg.layer_types} mixes two"
    window = cfg.sliding_window if "sliding" in cfg.layer_types else None
    if fmt == "gguf" and window is not None and window < cfg.context_length:
        return (
            f"a mistral-style model with sliding_window={window} (shorter than context_length={cfg.context_length}) "
            "has no GGUF form: llama.cpp runs Mistral as llama, which attends to the whole context"
        )
    return None


FAMILY = llama_like(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    gguf_architecture="llama",
    gguf_permute_qk=True,
    refuses=refuses,
)
