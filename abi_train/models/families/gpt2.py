"""GPT-2: LayerNorm, a learned position table, a plain GELU MLP (the tanh form GPT-2 and llama.cpp compute, or
exact as nanoGPT's), biases everywhere (or, with ``bias=false``, nowhere: nanoGPT's default), tied embeddings.

HF's Conv1D stores weights as (in, out), the transpose of nn.Linear; tensor names come with or without the
``transformer.`` prefix (GPT2LMHeadModel vs GPT2Model). HF and llama.cpp always have biases: a bias-free model
is written with zeros, and read back as bias-free when all of them are zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families import Family
from abi_train.models.families._common import GGUF_TOP, QKV, hf_act, need

GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    if c.get("activation_function", "gelu_new") not in GPT2_ACTS:
        raise UserError(
            f"{where}: activation_function={c['activation_function']!r} is not supported; "
            f"supported: {', '.join(GPT2_ACTS)}"
        )
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights", True) is False:
        raise UserError(f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not supported")
    d = int(need(c, "n_embd", where))
    return {
        "vocab_size": int(need(c, "vocab_size", where)),
        "context_length": int(need(c, "n_positions", where)),
        "n_layer": int(need(c, "n_layer", where)),
        "n_head": int(need(c, "n_head", where)),
        "d_model": d,
        "ffn_hidden": int(c.get("n_inner") or 4 * d),
        "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
        "bias": True,
        "act": hf_act(c, where, "activation_function", "gelu_new"),
    }


def hf_config(cfg: Any) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_hidden,
        "activation_function": "gelu_new" if cfg.act == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def config_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, Any], arch: str) -> dict[str, Any]:
    # All-zero biases are what the exporter writes for a bias-free gpt2: rebuild that model.
    return {"bias": any(tensors[n].any() for n in tensors if n.endswith(".bias"))}


def refuses(cfg: Any, fmt: str) -> str | None:
    if fmt == "gguf" and cfg.act != "gelu_tanh":
        return (
            f"llama.cpp's gpt2 computes the tanh GELU; a model.act={cfg.act} model would not run as trained: "
            "export it with --format hf"
        )
    return None


FAMILY = Family(
    name="gpt2",
    defaults={
        "norm": "layernorm",
        "norm_offset": False,
        "positions": "learned",
        "gated_mlp": False,
        "act": "gelu_tanh",
        "bias": True,
        "qkv_bias": False,
        "qk_norm": False,
        "embed_scale": False,
        "sandwich_norm": False,
    },
    hf_architectures=("GPT2LMHeadModel", "GPT2Model"),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    hf_block={
        "ln_1": ("norm1",),
        "attn.c_attn": QKV,
        "attn.c_proj": ("attn.proj",),
        "ln_2": ("norm2",),
        "mlp.c_fc": ("mlp.up",),
        "mlp.c_proj": ("mlp.down",),
    },
    hf_top={"transformer.wte": "tok_embd", "transformer.wpe": "pos_embd", "transformer.ln_f": "norm_f"}
    | {"lm_head": "lm_head"},
    hf_layers="transformer.h",
    hf_optional_prefix="transformer.",
    hf_transposed=frozenset({"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    hf_needs_biases=True,
    gguf_architecture="gpt2",
    gguf_block={
        "attn_norm": ("norm1",),
        "attn_qkv": QKV,
        "attn_output": ("attn.proj",),
        "ffn_norm": ("norm2",),
        "ffn_up": ("mlp.up",),
        "ffn_down": ("mlp.down",),
    },
    gguf_top=GGUF_TOP,
    gguf_needs_biases=True,
    config_from_gguf=config_from_gguf,
    refuses=refuses,
)
