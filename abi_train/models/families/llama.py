"""Llama (1-3.x; SmolLM/SmolLM2 are Llama too): the reference shape the other families differ from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.models.families import Family
from abi_train.models.families._common import (
    GGUF_BLOCK,
    GGUF_TOP,
    HF_BLOCK,
    HF_TOP,
    LLAMA_DEFAULTS,
    biases_from_gguf,
    llama_config_from_hf,
    llama_hf_config,
)


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    return llama_config_from_hf(c, where) | {"attention_bias": bool(c.get("attention_bias", False))}


def hf_config(cfg: Any) -> dict[str, Any]:
    return llama_hf_config(cfg, "LlamaForCausalLM", "llama") | {
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


FAMILY = Family(
    name="llama",
    defaults=LLAMA_DEFAULTS,
    hf_architectures=("LlamaForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block=HF_BLOCK,
    hf_top=HF_TOP,
    gguf_architecture="llama",
    gguf_block=GGUF_BLOCK,
    gguf_top=GGUF_TOP,
    gguf_permute_qk=True,
    config_from_gguf=biases_from_gguf,
)
