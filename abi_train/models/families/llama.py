"""Llama (1-3.x; SmolLM/SmolLM2 are Llama too): the reference shape the other families differ from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.models.families._common import (
    biases_from_gguf,
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
)


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    return llama_config_from_hf(c, where) | {"attention_bias": bool(c.get("attention_bias", False))}


def hf_config(cfg: Any) -> dict[str, Any]:
    return llama_hf_config(cfg, "LlamaForCausalLM", "llama") | {
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


FAMILY = llama_like(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    gguf_architecture="llama",
    gguf_permute_qk=True,
    config_from_gguf=biases_from_gguf,
)
