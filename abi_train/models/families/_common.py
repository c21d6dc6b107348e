"""What most families share: Llama's HF config keys and tensor names, llama.cpp's names. A family file takes
these and states only where it differs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families import Family

QKV = ("attn.q", "attn.k", "attn.v")

# The decoder switches of a Llama-like family (RMSNorm, RoPE, SwiGLU, no biases).
LLAMA_DEFAULTS: Mapping[str, Any] = {
    "norm": "rmsnorm",
    "norm_offset": False,
    "positions": "rope",
    "gated_mlp": True,
    "act": "silu",
    "bias": False,
    "qkv_bias": False,
    "qk_norm": False,
    "embed_scale": False,
    "sandwich_norm": False,
}

HF_BLOCK = {  # inside model.layers.N
    "input_layernorm": ("norm1",),
    "self_attn.q_proj": ("attn.q",),
    "self_attn.k_proj": ("attn.k",),
    "self_attn.v_proj": ("attn.v",),
    "self_attn.o_proj": ("attn.proj",),
    "post_attention_layernorm": ("norm2",),
    "mlp.gate_proj": ("mlp.gate",),
    "mlp.up_proj": ("mlp.up",),
    "mlp.down_proj": ("mlp.down",),
}
HF_QK_NORM = {"self_attn.q_norm": ("attn.q_norm",), "self_attn.k_norm": ("attn.k_norm",)}
HF_TOP = {"model.embed_tokens": "tok_embd", "model.norm": "norm_f", "lm_head": "lm_head"}

GGUF_BLOCK = {  # inside blk.N
    "attn_norm": ("norm1",),
    "attn_q": ("attn.q",),
    "attn_k": ("attn.k",),
    "attn_v": ("attn.v",),
    "attn_output": ("attn.proj",),
    "ffn_norm": ("norm2",),
    "ffn_gate": ("mlp.gate",),
    "ffn_up": ("mlp.up",),
    "ffn_down": ("mlp.down",),
}
GGUF_QK_NORM = {"attn_q_norm": ("attn.q_norm",), "attn_k_norm": ("attn.k_norm",)}
GGUF_TOP = {"token_embd": "tok_embd", "position_embd": "pos_embd", "output_norm": "norm_f", "output": "lm_head"}

HF_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
OUR_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def need(c: Mapping[str, Any], key: str, where: str) -> Any:
    if c.get(key) is None:
        raise UserError(f"{where} lacks {key!r}, which this model's config needs")
    return c[key]


def rope_from_hf(params: Any, c: Mapping[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, our rope_scaling) from one RoPE parameter set: transformers 4's rope_theta + rope_scaling or
    5's rope_parameters (``params``)."""
    params = params or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: rope_parameters / rope_scaling must be an object, got {params!r}")
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise UserError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
        return theta, {"type": "llama3", **{k: float(params[k]) for k in keys[:3]}, keys[3]: int(params[keys[3]])}
    if kind == "longrope":  # Phi-3's original_max_position_embeddings sits beside rope_scaling
        scaling = {"short_factor": params.get("short_factor"), "long_factor": params.get("long_factor")}
        scaling["original_max_position_embeddings"] = params.get(
            "original_max_position_embeddings", c.get("original_max_position_embeddings")
        )
        missing = [k for k, v in scaling.items() if v is None]
        if missing:
            raise UserError(f"{where}: longrope rope scaling lacks {', '.join(missing)}")
        optional = {k: float(params[k]) for k in ("factor", "attention_factor") if params.get(k) is not None}
        return theta, {
            "type": "longrope",
            "short_factor": [float(f) for f in scaling["short_factor"]],
            "long_factor": [float(f) for f in scaling["long_factor"]],
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            **optional,
        }
    raise UserError(f"{where}: rope type {kind!r} is not supported; supported: default, linear, llama3, longrope")


def hf_act(c: Mapping[str, Any], where: str, key: str = "hidden_act", default: str = "silu") -> str:
    act = c.get(key) or default
    if act not in HF_ACTS:
        raise UserError(f"{where}: {key}={act!r} is not supported; supported: {', '.join(HF_ACTS)}")
    return HF_ACTS[act]


def llama_config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The decoder config of a Llama-shaped config.json (the keys Llama, Qwen, Gemma, Phi, Mistral share)."""
    if c.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias=true is not supported (abi_train's gated MLP has no biases)")
    theta, scaling = rope_from_hf(c.get("rope_parameters") or c.get("rope_scaling"), c, where)
    d, n_head = int(need(c, "hidden_size", where)), int(need(c, "num_attention_heads", where))
    return {
        "vocab_size": int(need(c, "vocab_size", where)),
        "context_length": int(need(c, "max_position_embeddings", where)),
        "n_layer": int(need(c, "num_hidden_layers", where)),
        "n_head": n_head,
        "n_kv_head": int(c.get("num_key_value_heads") or n_head),
        "d_model": d,
        "head_dim": int(c.get("head_dim") or d // n_head),
        "ffn_hidden": int(need(c, "intermediate_size", where)),
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "act": hf_act(c, where),
    }


def full_attention_only(c: Mapping[str, Any], where: str) -> None:
    """Qwen3's and SmolLM3's configs can switch on a sliding window that no released model of theirs uses: its
    layers are those ``layer_types`` names (older files without it: use_sliding_window with a window)."""
    types = c.get("layer_types")
    if "sliding_attention" in types if types else c.get("use_sliding_window") and c.get("sliding_window"):
        raise UserError(
            f"{where}: sliding-window layers (use_sliding_window=true, layer_types) are not supported; abi_train "
            "reads full attention for this architecture"
        )


def sliding_refusal(cfg: Any) -> str | None:
    """Why a model with sliding layers has no form in a family that ``full_attention_only`` reads."""
    if "sliding" in cfg.layer_types:
        return f"a {cfg.style}-style model with sliding layers has no {cfg.style} form (set model.sliding_window: null)"
    return None


def gguf_bias_refusal(cfg: Any, fmt: str, arch: str) -> str | None:
    """Why a model with attention biases has no GGUF form where llama.cpp's graph loads none (qwen3, smollm3: a
    file with them fails to load)."""
    if fmt == "gguf" and cfg.attention_bias:
        return f"a {cfg.style}-style model with attention_bias=true has no GGUF form (llama.cpp's {arch} has no biases)"
    return None


def biases_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """HF's attention_bias (q/k/v/o) of a GGUF file: llama.cpp's Llama-shaped graphs add any bias they find."""
    return {"attention_bias": any(n.startswith("blk.") and n.endswith(".bias") for n in tensors)}


def rope_to_hf(theta: float, scaling: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(transformers 5's rope_parameters, transformers 4's rope_scaling) of one RoPE."""
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}, None
    old = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": scaling["type"]}
    return {**old, "rope_theta": theta}, old


def llama_hf_config(cfg: Any, architecture: str, model_type: str) -> dict[str, Any]:
    """The config.json keys of a Llama-shaped model (``cfg``: a GPTConfig)."""
    rope_parameters, rope_scaling = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": OUR_ACTS[cfg.act],
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_scaling": rope_scaling,  # transformers 4
        "rope_parameters": rope_parameters,  # transformers 5
        "attention_dropout": 0.0,
    }


def llama_like(**facts: Any) -> Family:
    """A family with Llama's switches and HF / GGUF name tables unless ``facts`` says otherwise (the fields of
    ``Family``): a family file states only where it differs."""
    tables = {"hf_block": HF_BLOCK, "hf_top": HF_TOP, "gguf_block": GGUF_BLOCK, "gguf_top": GGUF_TOP}
    return Family(**({"defaults": LLAMA_DEFAULTS, **tables} | facts))
