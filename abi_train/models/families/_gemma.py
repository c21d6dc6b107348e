"""What Gemma 2 and Gemma 3 share: Llama's shape with 1 + w RMSNorms, embeddings times sqrt(d_model), a tanh-GELU
GeGLU, a norm after each branch too (sandwich), a query scale of its own (``query_pre_attn_scalar``) and
sliding-window layers between full ones; how HF's config and llama.cpp's keys say so.

llama.cpp reads the attention pattern as a period (``attention.sliding_window_pattern``: layer i slides unless
i % period == period - 1, as HF's ``sliding_window_pattern``) and computes the query scale itself
(1/sqrt(head_dim), 1/sqrt(d_model / n_head) at the 27B's layer count): a model it would compute otherwise has
no GGUF form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families._common import (
    GGUF_BLOCK,
    HF_BLOCK,
    LLAMA_DEFAULTS,
    OUR_ACTS,
    hf_act,
    llama_config_from_hf,
    llama_hf_config,
)

DEFAULTS: Mapping[str, Any] = {
    **LLAMA_DEFAULTS,
    "norm_offset": True,
    "act": "gelu_tanh",
    "embed_scale": True,
    "sandwich_norm": True,
}

HF_GEMMA_BLOCK = {k: v for k, v in HF_BLOCK.items() if k != "post_attention_layernorm"} | {
    "post_attention_layernorm": ("post_attn_norm",),  # after attention, before the residual (not before the MLP)
    "pre_feedforward_layernorm": ("norm2",),
    "post_feedforward_layernorm": ("post_mlp_norm",),
}
GGUF_GEMMA_BLOCK = {**GGUF_BLOCK, "post_attention_norm": ("post_attn_norm",), "post_ffw_norm": ("post_mlp_norm",)}

HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}
OUR_LAYER_TYPES = {ours: theirs for theirs, ours in HF_LAYER_TYPES.items()}


def pattern_layers(period: int, n_layer: int) -> list[str]:
    """HF's and llama.cpp's periodic layout: every ``period``-th layer is full, the others slide."""
    return ["full" if period and i % period == period - 1 else "sliding" for i in range(n_layer)]


def period_of(layer_types: list[str]) -> int | None:
    """The smallest period ``pattern_layers`` rebuilds ``layer_types`` from (all sliding: n_layer + 1), or None."""
    n = len(layer_types)
    return next((p for p in range(1, n + 2) if pattern_layers(p, n) == layer_types), None)


def layer_types_from_hf(c: Mapping[str, Any], where: str, default_period: int) -> list[str]:
    if c.get("layer_types") is None:
        return pattern_layers(int(c.get("sliding_window_pattern") or default_period), int(c["num_hidden_layers"]))
    unknown = sorted(set(c["layer_types"]) - set(HF_LAYER_TYPES))
    if unknown:
        raise UserError(f"{where}: layer_types holds {unknown[0]!r}; supported: {', '.join(HF_LAYER_TYPES)}")
    return [HF_LAYER_TYPES[t] for t in c["layer_types"]]


def _number(value: float) -> int | float:
    """An integral float as an int (transformers' strict configs type query_pre_attn_scalar as int)."""
    return int(value) if float(value).is_integer() else value


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def gemma_config_from_hf(c: Mapping[str, Any], where: str, default_period: int) -> dict[str, Any]:
    """The decoder config of a Gemma 2 / 3 config.json, but RoPE (the families differ there)."""
    if c.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention=true is not supported (abi_train decoders are causal)")
    types = layer_types_from_hf(c, where, default_period)
    window = c.get("sliding_window")
    if "sliding" in types and not window:
        raise UserError(f"{where}: layer_types has sliding layers but sliding_window={window!r}")
    return llama_config_from_hf(c, where) | {
        "act": hf_act(c, where, "hidden_activation", "gelu_pytorch_tanh"),
        "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
        "attention_bias": bool(c.get("attention_bias", False)),
        "query_scale": float(c.get("query_pre_attn_scalar", 256)),
        "sliding_window": int(window) if window else None,
        "layer_types": types,
        "final_softcap": _float(c.get("final_logit_softcapping")),
    }


def gemma_hf_config(cfg: Any, architecture: str, model_type: str) -> dict[str, Any]:
    """The config.json keys of a Gemma 2 / 3 model (``cfg``: a GPTConfig); RoPE as Llama's."""
    out = llama_hf_config(cfg, architecture, model_type)
    del out["hidden_act"]  # Gemma's key is hidden_activation
    return out | {
        "hidden_activation": OUR_ACTS[cfg.act],
        "attention_bias": cfg.attention_bias,
        "query_pre_attn_scalar": _number(cfg.query_scale or cfg.head_dim),
        "sliding_window": cfg.sliding_window or cfg.context_length,  # transformers makes the sliding mask anyway
        "layer_types": [OUR_LAYER_TYPES[t] for t in cfg.layer_types],
        "final_logit_softcapping": cfg.final_softcap,
    }


def llamacpp_query_scale(d_model: int, n_head: int, head_dim: int, n_layer: int, n_layer_27b: int) -> float:
    """The query scale (scores times its -1/2 power) llama.cpp's gemma2 / gemma3 take for a shape: head_dim, but
    d_model / n_head at the 27B's layer count."""
    return float(d_model // n_head if n_layer == n_layer_27b else head_dim)


def gemma_refuses(cfg: Any, fmt: str, n_layer_27b: int, fixed: Mapping[str, Any]) -> str | None:
    """Why a model of a Gemma family has no form in ``fmt``: ``fixed`` holds the switches both formats imply."""
    changed = [f"{k}={getattr(cfg, k)}" for k, v in fixed.items() if getattr(cfg, k) != v]
    if changed:
        return f"a {cfg.style}-style model with {', '.join(changed)} has no {fmt.upper()} form ({cfg.style} fixes them)"
    if fmt != "gguf":
        return None
    if cfg.act != "gelu_tanh" or cfg.attention_bias:
        return f"llama.cpp's {cfg.style} has no attention biases and computes the tanh GELU: export with --format hf"
    if period_of(cfg.layer_types) is None:
        return (
            f"llama.cpp's {cfg.style} takes a periodic attention pattern (every n-th layer full), not "
            f"layer_types={cfg.layer_types}: export with --format hf"
        )
    want = llamacpp_query_scale(cfg.d_model, cfg.n_head, cfg.head_dim, cfg.n_layer, n_layer_27b)
    if (cfg.query_scale or cfg.head_dim) != want:
        return (
            f"llama.cpp's {cfg.style} scales scores by 1/sqrt({want:g}) for this shape, not "
            f"model.query_scale={cfg.query_scale}: export with --format hf"
        )
    return None


def gemma_gguf_metadata(writer: Any, cfg: Any) -> None:
    """The attention pattern and final soft-cap (the keys both Gemma architectures read)."""
    if "sliding" in cfg.layer_types:  # a window turns llama.cpp's sliding layers on: none without one
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern(period_of(cfg.layer_types))
    if cfg.final_softcap:
        writer.add_final_logit_softcapping(cfg.final_softcap)


def gemma_config_from_gguf(
    kv: Mapping[str, Any], arch: str, default_period: int, default_window: int | None, n_layer_27b: int
) -> dict[str, Any]:
    """The attention pattern and query scale of a Gemma GGUF file, as llama.cpp reads them (its defaults where a
    key is absent: a window turns the pattern on)."""
    n_layer, window = kv[f"{arch}.block_count"], kv.get(f"{arch}.attention.sliding_window", default_window)
    period = kv.get(f"{arch}.attention.sliding_window_pattern", default_period)
    if not isinstance(period, int):
        raise UserError(f"GGUF {arch}.attention.sliding_window_pattern is a per-layer list; abi_train reads a period")
    d_model, n_head = kv[f"{arch}.embedding_length"], kv[f"{arch}.attention.head_count"]
    head_dim = kv.get(f"{arch}.attention.key_length", d_model // n_head)
    return {
        "sliding_window": window or None,
        "layer_types": pattern_layers(period, n_layer) if window else ["full"] * n_layer,
        "query_scale": llamacpp_query_scale(d_model, n_head, head_dim, n_layer, n_layer_27b),
        "final_softcap": kv.get(f"{arch}.final_logit_softcapping"),
    }
