"""Gemma 2 (Gemma2ForCausalLM; llama.cpp's gemma2): Gemma's shape (families/_gemma.py) with soft-capped attention
scores (50) and final logits (30), sliding and full layers alternating (layer 0 slides), one RoPE base.

llama.cpp's gemma2 always caps both (its defaults where the keys are absent) and always ties the head to the
embedding: a model without caps, or with its own head, has no GGUF form."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.models.families import Family
from abi_train.models.families._common import GGUF_TOP, HF_TOP
from abi_train.models.families._gemma import (
    DEFAULTS,
    GGUF_GEMMA_BLOCK,
    HF_GEMMA_BLOCK,
    gemma_config_from_gguf,
    gemma_config_from_hf,
    gemma_gguf_metadata,
    gemma_hf_config,
    gemma_refuses,
)

PERIOD = 2  # sliding, full, sliding, ...
N_LAYER_27B = 46  # llama.cpp's gemma2 takes the 27B's query scale (d_model / n_head) at this layer count
WINDOW = 4096  # llama.cpp's gemma2 window where the file names none
FIXED = {"qk_norm": False, "rope_local_theta": None, "sandwich_norm": True, "embed_scale": True, "norm_offset": True}


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    cap = c.get("attn_logit_softcapping")
    return gemma_config_from_hf(c, where, PERIOD) | {"attn_softcap": None if cap is None else float(cap)}


def hf_config(cfg: Any) -> dict[str, Any]:
    return gemma_hf_config(cfg, "Gemma2ForCausalLM", "gemma2") | {"attn_logit_softcapping": cfg.attn_softcap}


def refuses(cfg: Any, fmt: str) -> str | None:
    reason = gemma_refuses(cfg, fmt, N_LAYER_27B, FIXED)
    if reason or fmt != "gguf":
        return reason
    if not (cfg.attn_softcap and cfg.final_softcap and cfg.tie_embeddings and "sliding" in cfg.layer_types):
        return (
            "llama.cpp's gemma2 always soft-caps scores and logits, ties the head to the embedding and has sliding "
            "layers: a model with attn_softcap / final_softcap null, tie_embeddings=false or no sliding layer has no "
            "GGUF form (export with --format hf)"
        )
    return None


def gguf_metadata(writer: Any, cfg: Any) -> None:
    gemma_gguf_metadata(writer, cfg)
    writer.add_attn_logit_softcapping(cfg.attn_softcap)


def config_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, Any], arch: str) -> dict[str, Any]:
    out = gemma_config_from_gguf(kv, arch, PERIOD, WINDOW, N_LAYER_27B)
    caps = {"attn_softcap": kv.get(f"{arch}.attn_logit_softcapping", 50.0)}  # llama.cpp's defaults
    return out | caps | {"final_softcap": out["final_softcap"] or 30.0}


FAMILY = Family(
    name="gemma2",
    defaults=DEFAULTS,  # the caps stay explicit: null is "no cap" in HF's config
    hf_architectures=("Gemma2ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block=HF_GEMMA_BLOCK,
    hf_top=HF_TOP,
    gguf_architecture="gemma2",
    gguf_block=GGUF_GEMMA_BLOCK,
    gguf_top=GGUF_TOP,
    gguf_metadata=gguf_metadata,
    config_from_gguf=config_from_gguf,
    refuses=refuses,
)
