"""GGUF name map and hyperparameters for ``models.gpt``: llama.cpp's ``llama`` and ``gpt2`` architectures.

- llama: our fused ``qkv`` is split into ``attn_q/attn_k/attn_v``, and Q/K rows are permuted per head
  from rotate-half RoPE (pairs i, i+d/2) to llama.cpp's adjacent pairs (2i, 2i+1), exactly as
  llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` does. V and the output projection are not.
- gpt2: ``attn_qkv`` stays fused (rows [q|k|v], with bias); ``position_embd`` has context_length rows.
- Tied embeddings: no ``output.weight`` (llama.cpp then reuses ``token_embd``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter

from abi_train.errors import UserError
from abi_train.export.gguf_common import add_tokenizer

NEEDS_TOKENIZER = True
ARCHITECTURES = ("llama", "gpt2")
KEEP_F32 = ("position_embd.weight",)

TOP = {"tok_embd": "token_embd", "pos_embd": "position_embd", "norm_f": "output_norm", "lm_head": "output"}
BLOCK = {
    "llama": {
        "norm1": "attn_norm",
        "attn.proj": "attn_output",
        "norm2": "ffn_norm",
        "mlp.gate": "ffn_gate",
        "mlp.up": "ffn_up",
        "mlp.down": "ffn_down",
    },
    "gpt2": {
        "norm1": "attn_norm",
        "attn.qkv": "attn_qkv",
        "attn.proj": "attn_output",
        "norm2": "ffn_norm",
        "mlp.fc": "ffn_up",
        "mlp.proj": "ffn_down",
    },
}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, reorder rows [0..d/2 | d/2..d] to interleaved [0, d/2, 1, d/2+1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def architecture(model: Any) -> str:
    return model.cfg.style  # "llama" | "gpt2" are llama.cpp's architecture names too


def add_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], tokenizer_path: Path) -> None:
    c = model.cfg
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_vocab_size(c.vocab_size)
    if c.style == "llama":
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.d_model // c.n_head)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
    add_tokenizer(writer, tokenizer_path, c.vocab_size)


def to_gguf(model: Any) -> dict[str, torch.Tensor]:
    c = model.cfg
    hd = c.d_model // c.n_head
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        *module, kind = name.split(".")
        if module[0] == "blocks":
            prefix, module = f"blk.{module[1]}", ".".join(module[2:])
            if c.style == "llama" and module == "attn.qkv":
                q, k, v = t.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
                out[f"{prefix}.attn_q.{kind}"] = permute(q, c.n_head)
                out[f"{prefix}.attn_k.{kind}"] = permute(k, c.n_kv_head)
                out[f"{prefix}.attn_v.{kind}"] = v
            else:
                out[f"{prefix}.{BLOCK[c.style][module]}.{kind}"] = t
        elif not (module[0] == "lm_head" and c.tie_embeddings):
            out[f"{TOP[module[0]]}.{kind}"] = t
    if c.style == "gpt2" and not c.bias:
        # llama.cpp's gpt2 graph requires every linear and LayerNorm bias: zeros compute the same function.
        for name, t in list(out.items()):
            if name.endswith(".weight") and not name.startswith(("token_embd.", "position_embd.", "output.")):
                out[name.removesuffix("weight") + "bias"] = torch.zeros(t.shape[0], dtype=t.dtype)
    return out


def _need(kv: dict[str, Any], key: str) -> Any:
    if key not in kv:
        raise UserError(f"GGUF file lacks the metadata key {key!r}")
    return kv[key]


def config_from_gguf(kv: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    a = kv["general.architecture"]
    llama = a == "llama"
    n_head = _need(kv, f"{a}.attention.head_count")
    d_model = _need(kv, f"{a}.embedding_length")
    if llama and kv.get(f"{a}.rope.dimension_count", d_model // n_head) != d_model // n_head:
        raise UserError("GGUF llama model uses partial RoPE (rope.dimension_count != head size); not supported")
    cfg = {
        "arch": "gpt",
        "name": kv.get("general.name", "gpt"),
        "style": a,
        "vocab_size": _need(tensors, "token_embd.weight").shape[0],
        "context_length": _need(kv, f"{a}.context_length"),
        "n_layer": _need(kv, f"{a}.block_count"),
        "n_head": n_head,
        "n_kv_head": kv.get(f"{a}.attention.head_count_kv", n_head),
        "d_model": d_model,
        "ffn_hidden": _need(kv, f"{a}.feed_forward_length"),
        "norm_eps": _need(kv, f"{a}.attention.layer_norm{'_rms' if llama else ''}_epsilon"),
        "tie_embeddings": "output.weight" not in tensors,
        # All-zero biases are what the exporter writes for a bias-free gpt2: rebuild that model.
        "bias": any(t.any() for name, t in tensors.items() if name.endswith(".bias")),
    }
    if llama:
        cfg["rope_theta"] = kv.get(f"{a}.rope.freq_base", 10000.0)
    return cfg


def from_gguf(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    inverse_top = {v: k for k, v in TOP.items()}
    inverse_block = {v: k for k, v in BLOCK[config["style"]].items()}
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[-1] == "bias" and not config["bias"]:
            continue
        try:
            if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k", "attn_v") and config["style"] == "llama":
                qkv[f"blocks.{parts[1]}.attn.qkv.{parts[3]}"][parts[2]] = t
            elif parts[0] == "blk":
                sd[f"blocks.{parts[1]}.{inverse_block[parts[2]]}.{parts[3]}"] = t
            else:
                sd[f"{inverse_top[parts[0]]}.{parts[1]}"] = t
        except (KeyError, IndexError):
            raise UserError(f"GGUF tensor {name!r} has no place in a {config['style']} model") from None
    n_kv_head = config["n_kv_head"]
    for name, p in qkv.items():
        if len(p) != 3:
            raise UserError(f"GGUF file lacks one of attn_q/attn_k/attn_v for {name}")
        sd[name] = torch.cat([unpermute(p["attn_q"], config["n_head"]), unpermute(p["attn_k"], n_kv_head), p["attn_v"]])
    if config["tie_embeddings"]:
        sd["lm_head.weight"] = sd["tok_embd.weight"]
    return sd
