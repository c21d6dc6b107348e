"""Gemma 3, text only (Gemma3ForCausalLM, model_type gemma3_text; llama.cpp's gemma3): Gemma's shape
(families/_gemma.py) with q/k RMSNorm (1 + w) and no attention soft-cap (transformers' Gemma 3 never applies
attn_logit_softcapping), five sliding layers to one full, and two RoPE bases: ``rope_theta`` (1e6; linearly
scaled by 8 from 4B up) on full layers, ``rope_local_base_freq`` (1e4, unscaled) on sliding ones. transformers 5
keys both under ``rope_parameters`` by layer type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families import Family
from abi_train.models.families._common import GGUF_QK_NORM, GGUF_TOP, HF_QK_NORM, HF_TOP, rope_from_hf, rope_to_hf
from abi_train.models.families._gemma import (
    DEFAULTS,
    GGUF_GEMMA_BLOCK,
    HF_GEMMA_BLOCK,
    HF_LAYER_TYPES,
    gemma_config_from_gguf,
    gemma_config_from_hf,
    gemma_gguf_metadata,
    gemma_hf_config,
    gemma_refuses,
    period_of,
)

PERIOD = 6  # every 6th layer full (HF's sliding_window_pattern default, llama.cpp's gemma3 default)
N_LAYER_27B = 62  # llama.cpp's gemma3 takes the 27B's query scale (d_model / n_head) at this layer count
FIXED = {"qk_norm": True, "attn_softcap": None, "sandwich_norm": True, "embed_scale": True, "norm_offset": True}


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = c.get("rope_parameters") or {}
    keyed = any(t in params for t in HF_LAYER_TYPES)  # transformers 5: one RoPE per layer type
    full = params.get("full_attention") if keyed else params or c.get("rope_scaling")
    theta, scaling = rope_from_hf(full, {"rope_theta": c.get("rope_theta", 1e6)}, where)
    local = params.get("sliding_attention") if keyed else None
    local_theta, local_scaling = rope_from_hf(local, {"rope_theta": c.get("rope_local_base_freq", 1e4)}, where)
    if local_scaling:
        raise UserError(f"{where}: scaled RoPE on sliding layers ({local}) is not supported; they take plain RoPE")
    return gemma_config_from_hf(c, where, PERIOD) | {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_local_theta": local_theta,
    }


def hf_config(cfg: Any) -> dict[str, Any]:
    full, _ = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    local = cfg.rope_local_theta  # never null: the family's default fills it
    period = period_of(cfg.layer_types)
    return gemma_hf_config(cfg, "Gemma3ForCausalLM", "gemma3_text") | {
        "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}},
        "rope_local_base_freq": local,  # transformers 4
        "attn_logit_softcapping": None,
        **({"sliding_window_pattern": period} if period else {}),  # transformers < 4.53 (before layer_types)
    }


def refuses(cfg: Any, fmt: str) -> str | None:
    return gemma_refuses(cfg, fmt, N_LAYER_27B, FIXED)


def gguf_metadata(writer: Any, cfg: Any) -> None:
    gemma_gguf_metadata(writer, cfg)
    writer.add_rope_freq_base_swa(cfg.rope_local_theta)


def config_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, Any], arch: str) -> dict[str, Any]:
    local = float(kv.get(f"{arch}.rope.freq_base_swa", 1e4))  # llama.cpp's gemma3 default
    return gemma_config_from_gguf(kv, arch, PERIOD, None, N_LAYER_27B) | {"rope_local_theta": local}


FAMILY = Family(
    name="gemma3",
    defaults={**DEFAULTS, "qk_norm": True, "rope_local_theta": 1e4},
    hf_architectures=("Gemma3ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block={**HF_GEMMA_BLOCK, **HF_QK_NORM},
    hf_top=HF_TOP,
    gguf_architecture="gemma3",
    gguf_block={**GGUF_GEMMA_BLOCK, **GGUF_QK_NORM},
    gguf_top=GGUF_TOP,
    gguf_metadata=gguf_metadata,
    config_from_gguf=config_from_gguf,
    refuses=refuses,
)
