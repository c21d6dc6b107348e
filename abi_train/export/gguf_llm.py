"""GGUF name map and hyperparameters for ``models.gpt``: llama.cpp's ``llama``, ``qwen2`` and ``gpt2`` architectures.

- llama: our fused ``qkv`` is split into ``attn_q/attn_k/attn_v``, and Q/K rows (and their biases, with
  ``attention_bias``) are permuted per head from rotate-half RoPE (pairs i, i+d/2) to llama.cpp's adjacent
  pairs (2i, 2i+1), exactly as llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` does. V and the
  output projection are not.
- qwen2: llama.cpp rotates it NeoX-style (rotate-half, as we do), so nothing is permuted; q/k/v biases.
- gpt2: ``attn_qkv`` stays fused (rows [q|k|v], with bias); ``position_embd`` has context_length rows.
- Tied embeddings: no ``output.weight`` (llama.cpp then reuses ``token_embd``).
- RoPE: ``head_dim`` apart from d_model/n_head is ``attention.key_length``/``value_length``; linear scaling is
  ``rope.scaling.type/factor``; Llama 3's scaling is the ``rope_freqs.weight`` tensor of per-frequency divisors
  that llama.cpp's converter writes (and reads back into our ``rope_scaling``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter, RopeScalingType

from abi_train.errors import UserError
from abi_train.export.gguf_common import add_tokenizer
from abi_train.models.layers import rope_frequencies

NEEDS_TOKENIZER = True
ARCHITECTURES = ("llama", "qwen2", "gpt2")
KEEP_F32 = ("position_embd.weight",)
ROTARY = ("llama", "qwen2")

TOP = {"tok_embd": "token_embd", "pos_embd": "position_embd", "norm_f": "output_norm", "lm_head": "output"}
_ROTARY_BLOCK = {
    "norm1": "attn_norm",
    "attn.proj": "attn_output",
    "norm2": "ffn_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}
BLOCK = {
    "llama": _ROTARY_BLOCK,
    "qwen2": _ROTARY_BLOCK,
    "gpt2": {
        "norm1": "attn_norm",
        "attn.qkv": "attn_qkv",
        "attn.proj": "attn_output",
        "norm2": "ffn_norm",
        "mlp.fc": "ffn_up",
        "mlp.proj": "ffn_down",
    },
}
ROPE_FREQS = "rope_freqs.weight"


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, reorder rows [0..d/2 | d/2..d] to interleaved [0, d/2, 1, d/2+1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def architecture(model: Any) -> str:
    return model.cfg.style  # "llama" | "qwen2" | "gpt2" are llama.cpp's architecture names too


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: per frequency, the divisor Llama 3 scaling applies (1 = unchanged)."""
    return rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, scaling)


def add_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], tokenizer_path: Path) -> None:
    c = model.cfg
    if c.style == "gpt2" and c.act != "gelu_tanh":
        raise UserError(
            f"llama.cpp's gpt2 computes the tanh GELU; a model.act={c.act} model would not run as trained: "
            "export it with --format hf"
        )
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_vocab_size(c.vocab_size)
    if c.style in ROTARY:
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.head_dim)
        if c.head_dim * c.n_head != c.d_model:
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
        if (c.rope_scaling or {}).get("type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    else:
        writer.add_layer_norm_eps(c.norm_eps)
    add_tokenizer(writer, tokenizer_path, c.vocab_size)


def to_gguf(model: Any) -> dict[str, torch.Tensor]:
    c = model.cfg
    hd = c.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        *module, kind = name.split(".")
        if module[0] == "blocks":
            prefix, module = f"blk.{module[1]}", ".".join(module[2:])
            if c.style in ROTARY and module == "attn.qkv":
                q, k, v = t.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
                if c.style == "llama":
                    q, k = permute(q, c.n_head), permute(k, c.n_kv_head)
                out[f"{prefix}.attn_q.{kind}"] = q
                out[f"{prefix}.attn_k.{kind}"] = k
                out[f"{prefix}.attn_v.{kind}"] = v
            else:
                out[f"{prefix}.{BLOCK[c.style][module]}.{kind}"] = t
        elif not (module[0] == "lm_head" and c.tie_embeddings):
            out[f"{TOP[module[0]]}.{kind}"] = t
    if (c.rope_scaling or {}).get("type") == "llama3":
        out[ROPE_FREQS] = llama3_rope_factors(hd, c.rope_theta, c.rope_scaling)
    if c.style == "gpt2" and not c.bias:
        # llama.cpp's gpt2 graph requires every linear and LayerNorm bias: zeros compute the same function.
        for name, t in list(out.items()):
            if name.endswith(".weight") and not name.startswith(("token_embd.", "position_embd.", "output.")):
                out[name.removesuffix("weight") + "bias"] = torch.zeros(t.shape[0], dtype=t.dtype)
    return out


def _need(kv: Mapping[str, Any], key: str) -> Any:
    if key not in kv:
        raise UserError(f"GGUF file lacks the metadata key {key!r}")
    return kv[key]


def _shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, without dequantizing it when the mapping can tell (reader.GGUFTensors)."""
    _need(tensors, name)
    return tensors.shape(name) if hasattr(tensors, "shape") else tuple(tensors[name].shape)


def llama3_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Our ``rope_scaling`` back from llama.cpp's ``rope_freqs`` divisors. The divisors fix only the two
    wavelengths where scaling starts and ends (old_context/low, old_context/high), so the parameters are
    taken as Llama 3's own (low_freq_factor 1, high 4, 8192) or other round values when those reproduce the
    file, else fitted; whichever is taken must reproduce every stored divisor to 1e-6."""
    factors = factors.float().flatten()
    if factors.numel() != head_dim // 2:
        raise UserError(f"GGUF {ROPE_FREQS} has {factors.numel()} entries; the head size needs {head_dim // 2}")
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    factor = float(factors.max())
    candidates = [(1.0, high, float(2**e)) for e in (13, *range(4, 18)) for high in (4.0, 2.0, 8.0)]
    inv = rope_frequencies(head_dim, theta).double()
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    # With low = 1, each divisor f between 1 and factor gives s = (1/f - 1/factor) / (1 - 1/factor) and
    # s * (high - 1) = old * inv / 2pi - 1: two such divisors fix (old, high); one fixes old given high; none
    # leaves old anywhere between the last unscaled and the first scaled wavelength.
    f = factors.double()[medium]
    s = (1 / f - 1 / factor) / (1 - 1 / factor)
    y = inv[medium] / (2 * math.pi)
    if len(f) >= 2:
        a = torch.stack([y, -s], dim=1)
        old, high = torch.linalg.lstsq(a, (1 - s).unsqueeze(1)).solution.flatten().tolist()
        candidates += [(1.0, round(high, 4), float(round(old))), (1.0, high, old)]
    elif len(f) == 1:
        candidates += [(1.0, h, float((1 - s[0] + s[0] * h) / y[0])) for h in (4.0, 2.0, 8.0, 3.0)]
    else:
        wavelen = 2 * math.pi / inv
        unscaled, scaled = wavelen[factors <= 1 + 1e-6], wavelen[factors >= factor * (1 - 1e-6)]
        if len(unscaled) and len(scaled):
            lo, hi = float(unscaled.max()), float(scaled.min())
            high = min(4.0, math.sqrt(hi / lo))
            candidates.append((1.0, high, math.sqrt(high * lo * hi)))
    for low, high, old in candidates:
        if high <= low:
            continue
        scaling = {
            "type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": int(old) if float(old).is_integer() else old,
        }
        if torch.allclose(llama3_rope_factors(head_dim, theta, scaling), factors, rtol=1e-6, atol=1e-6):
            return scaling
    raise UserError(f"GGUF {ROPE_FREQS} holds RoPE divisors that Llama 3's scaling does not reproduce; not supported")


def config_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    a = kv["general.architecture"]
    rotary = a in ROTARY
    n_head = _need(kv, f"{a}.attention.head_count")
    d_model = _need(kv, f"{a}.embedding_length")
    cfg: dict[str, Any] = {
        "arch": "gpt",
        "name": kv.get("general.name", "gpt"),
        "style": a,
        "vocab_size": _shape(tensors, "token_embd.weight")[0],
        "context_length": _need(kv, f"{a}.context_length"),
        "n_layer": _need(kv, f"{a}.block_count"),
        "n_head": n_head,
        "n_kv_head": kv.get(f"{a}.attention.head_count_kv", n_head),
        "d_model": d_model,
        "ffn_hidden": _need(kv, f"{a}.feed_forward_length"),
        "norm_eps": _need(kv, f"{a}.attention.layer_norm{'_rms' if rotary else ''}_epsilon"),
        "tie_embeddings": "output.weight" not in tensors,
    }
    if not rotary:
        # All-zero biases are what the exporter writes for a bias-free gpt2: rebuild that model.
        cfg["bias"] = any(tensors[n].any() for n in tensors if n.endswith(".bias"))
        return cfg
    head_dim = kv.get(f"{a}.attention.key_length", d_model // n_head)
    if kv.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise UserError("GGUF model has attention.value_length != key_length; abi_train models use one head size")
    if kv.get(f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise UserError("GGUF model uses partial RoPE (rope.dimension_count != head size); not supported")
    if head_dim != d_model // n_head or d_model % n_head:
        cfg["head_dim"] = head_dim
    cfg["rope_theta"] = float(kv.get(f"{a}.rope.freq_base", 10000.0))
    kind = kv.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(_need(kv, f"{a}.rope.scaling.factor"))}
    elif kind != "none":
        raise UserError(f"GGUF rope.scaling.type {kind!r} is not supported; supported: none, linear (and llama3)")
    if ROPE_FREQS in tensors:
        if "rope_scaling" in cfg:
            raise UserError(f"GGUF file has both rope.scaling.type and {ROPE_FREQS}; not supported")
        if (scaling := llama3_scaling_from_factors(tensors[ROPE_FREQS], head_dim, cfg["rope_theta"])) is not None:
            cfg["rope_scaling"] = scaling
    if a == "llama" and any(n.startswith("blk.") and n.endswith(".bias") for n in tensors):
        cfg["attention_bias"] = True
    return cfg


def from_gguf(tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    style = config["style"]
    inverse_top = {v: k for k, v in TOP.items()}
    inverse_block = {v: k for k, v in BLOCK[style].items()}
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name in tensors:
        parts = name.split(".")
        if name == ROPE_FREQS or (parts[-1] == "bias" and style == "gpt2" and not config["bias"]):
            continue  # rope_freqs is config (rope_scaling); zero biases of a bias-free gpt2
        try:
            if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k", "attn_v") and style in ROTARY:
                qkv[f"blocks.{parts[1]}.attn.qkv.{parts[3]}"][parts[2]] = tensors[name]
            elif parts[0] == "blk":
                sd[f"blocks.{parts[1]}.{inverse_block[parts[2]]}.{parts[3]}"] = tensors[name]
            else:
                sd[f"{inverse_top[parts[0]]}.{parts[1]}"] = tensors[name]
        except (KeyError, IndexError):
            raise UserError(f"GGUF tensor {name!r} has no place in a {style} model") from None
    n_head, n_kv_head = config["n_head"], config["n_kv_head"]
    for name, p in qkv.items():
        if len(p) != 3:
            raise UserError(f"GGUF file lacks one of attn_q/attn_k/attn_v for {name}")
        q, k = p["attn_q"], p["attn_k"]
        if style == "llama":
            q, k = unpermute(q, n_head), unpermute(k, n_kv_head)
        sd[name] = torch.cat([q, k, p["attn_v"]])
    if config.get("attention_bias"):
        # HF Llama's attention_bias has o_proj's bias too; a file with q/k/v biases only gets zeros there.
        for i in range(config["n_layer"]):
            w = sd.get(f"blocks.{i}.attn.proj.weight")
            if w is not None:
                sd.setdefault(f"blocks.{i}.attn.proj.bias", torch.zeros(w.shape[0]))
    if config["tie_embeddings"]:
        sd["lm_head.weight"] = sd["tok_embd.weight"]
    return sd
