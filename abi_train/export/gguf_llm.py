"""GGUF name map and hyperparameters for ``models.gpt``: every LLM family (``models/families``) as the llama.cpp
architecture its family file names (llama, qwen2, qwen3, gemma2, gemma3, phi3, smollm3, gpt2, ...).

- Tensors: the family's GGUF table (``models.qkv`` splits our fused ``qkv`` into ``attn_q/attn_k/attn_v`` or
  keeps it fused as ``attn_qkv``). Where the family says llama.cpp rotates adjacent pairs (``gguf_permute_qk``:
  llama), Q/K rows (and their biases) are permuted per head from rotate-half RoPE (pairs i, i+d/2) to llama.cpp's
  (2i, 2i+1), exactly as llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` does.
- Gemma's ``1 + w`` RMSNorms are written as the plain weight llama.cpp multiplies by (w + 1), as its converter does.
- Tied embeddings: no ``output.weight`` (llama.cpp then reuses ``token_embd``).
- RoPE: ``head_dim`` apart from d_model/n_head is ``attention.key_length``/``value_length``; partial rotary is
  ``rope.dimension_count``; linear scaling is ``rope.scaling.type/factor``; Llama 3's scaling is the
  ``rope_freqs.weight`` tensor of per-frequency divisors that llama.cpp's converter writes (and reads back into
  our ``rope_scaling``); LongRoPE (Phi-3/4) is ``rope_factors_long/short.weight`` with
  ``rope.scaling.attn_factor`` and ``rope.scaling.original_context_length``, as llama.cpp's Phi3MiniModel writes
  them (llama.cpp picks the long factors when its context exceeds the original length, as our table does), for
  the architectures whose llama.cpp graph reads them. A family's own keys (sliding window, soft-caps) come from
  its ``gguf_metadata``.
- Our own files carry ``abi_train.style``, so a family llama.cpp shares an architecture with (Mistral: llama)
  comes back as itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, GGUFWriter, RopeScalingType

from abi_train.errors import UserError
from abi_train.export.gguf_common import add_tokenizer
from abi_train.models.families import Family, families, family, family_for_gguf
from abi_train.models.gpt import GPTConfig, gpt_config
from abi_train.models.layers import RMSNorm, rope_attention_factor, rope_frequencies
from abi_train.models.qkv import (
    add_zero_biases,
    check_parts,
    from_parts,
    group,
    permute_rope,
    rope_heads,
    to_parts,
    ungroup,
    unpermute_rope,
)

NEEDS_TOKENIZER = True
ARCHITECTURES = tuple(sorted({fam.gguf_architecture for fam in families().values()}))
KEEP_F32 = ("position_embd.weight",)
ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}  # LongRoPE
STYLE_KEY = "abi_train.style"
LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def architecture(model: Any) -> str:
    return family(model.cfg.style).gguf_architecture


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: per frequency, the divisor Llama 3 scaling applies (1 = unchanged)."""
    return rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, scaling)


def takes_rope_factors(arch: str) -> bool:
    """Whether llama.cpp's ``arch`` reads LongRoPE's rope_factors_long/short (gguf-py's tensor lists say)."""
    ids = {name: a for a, name in MODEL_ARCH_NAMES.items()}
    return arch in ids and MODEL_TENSOR.ROPE_FACTORS_LONG in MODEL_TENSORS[ids[arch]]


def _longrope(c: GPTConfig) -> bool:
    return (c.rope_scaling or {}).get("type") == "longrope"


def refusal(model: Any) -> str | None:
    """Why ``model`` has no GGUF form llama.cpp computes as we do (None: it has one); the trainer asks before
    training a run that ends with export=gguf."""
    c = model.cfg
    fam = family(c.style)
    if _longrope(c) and not takes_rope_factors(fam.gguf_architecture):
        return (
            f"llama.cpp's {fam.gguf_architecture} reads no LongRoPE factors: a style={c.style} model with "
            "rope_scaling.type=longrope would not run as trained in GGUF; export it with --format hf"
        )
    return fam.refusal(c, "gguf")


def add_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], tokenizer_path: Path) -> None:
    c = model.cfg
    fam = family(c.style)
    reason = refusal(model)
    if reason:
        raise UserError(reason)
    writer.add_string(STYLE_KEY, c.style)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_vocab_size(c.vocab_size)
    if c.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(c.norm_eps)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
    if c.positions == "rope":
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.rope_dim)
        if c.head_dim * c.n_head != c.d_model:
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
        if (c.rope_scaling or {}).get("type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
        if _longrope(c):
            writer.add_rope_scaling_attn_factors(rope_attention_factor(c.rope_scaling, c.context_length))
            writer.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
    if fam.gguf_metadata is not None:
        fam.gguf_metadata(writer, c)
    add_tokenizer(writer, tokenizer_path, c.vocab_size)


def offset_norms(model_or_config: Any) -> set[str]:
    """The weights of RMSNorms that scale by 1 + w (Gemma), which llama.cpp stores as w + 1."""
    if isinstance(model_or_config, GPTConfig):
        if not model_or_config.norm_offset:
            return set()
        from abi_train.models.gpt import GPT

        with torch.device("meta"):
            model_or_config = GPT(model_or_config)
    return {f"{n}.weight" for n, m in model_or_config.named_modules() if isinstance(m, RMSNorm) and m.offset}


def _permute(fam: Family, c: GPTConfig, inverse: bool = False) -> Any:
    heads = rope_heads(c)

    def transform(theirs: str, part: str, kind: str, t: torch.Tensor) -> torch.Tensor:
        if not fam.gguf_permute_qk or part not in heads:
            return t
        return (unpermute_rope if inverse else permute_rope)(t, heads[part])

    return transform


def to_gguf(model: Any) -> dict[str, torch.Tensor]:
    c = model.cfg
    fam = family(c.style)
    state = dict(model.state_dict())
    for name in offset_norms(model):
        state[name] = state[name] + 1
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    parts = to_parts(state, c)
    if fam.gguf_needs_biases and not c.bias:
        add_zero_biases(parts)  # llama.cpp's gpt2 graph requires every linear and LayerNorm bias
    top = {ours: theirs for theirs, ours in fam.gguf_top.items()}
    out = group(parts, c, fam.gguf_block, top, lambda i: f"blk.{i}.", _permute(fam, c))
    if (c.rope_scaling or {}).get("type") == "llama3":
        out[ROPE_FREQS] = llama3_rope_factors(c.rope_dim, c.rope_theta, c.rope_scaling)
    if _longrope(c):
        out |= {name: torch.tensor(c.rope_scaling[key], dtype=torch.float32) for key, name in ROPE_FACTORS.items()}
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
    fam = family(kv[STYLE_KEY]) if STYLE_KEY in kv else family_for_gguf(a)
    if fam is None:
        supported = ", ".join(ARCHITECTURES)
        raise UserError(f"GGUF architecture {a!r} is not one abi_train can rebuild; supported: {supported}")
    n_head = _need(kv, f"{a}.attention.head_count")
    d_model = _need(kv, f"{a}.embedding_length")
    rms = f"{a}.attention.layer_norm_rms_epsilon" in kv
    cfg: dict[str, Any] = {
        "arch": "gpt",
        "name": kv.get("general.name", "gpt"),
        "style": fam.name,
        "vocab_size": _shape(tensors, "token_embd.weight")[0],
        "context_length": _need(kv, f"{a}.context_length"),
        "n_layer": _need(kv, f"{a}.block_count"),
        "n_head": n_head,
        "n_kv_head": kv.get(f"{a}.attention.head_count_kv", n_head),
        "d_model": d_model,
        "ffn_hidden": _need(kv, f"{a}.feed_forward_length"),
        "norm_eps": _need(kv, f"{a}.attention.layer_norm{'_rms' if rms else ''}_epsilon"),
        "tie_embeddings": "output.weight" not in tensors,
    }
    if fam.defaults.get("positions") == "rope":
        cfg |= _rope_config(kv, tensors, a, n_head, d_model)
    if fam.config_from_gguf is not None:
        cfg |= fam.config_from_gguf(kv, tensors, a)
    return cfg


def _rope_config(
    kv: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], a: str, n_head: int, d_model: int
) -> dict[str, Any]:
    head_dim = kv.get(f"{a}.attention.key_length", d_model // n_head)
    if kv.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise UserError("GGUF model has attention.value_length != key_length; abi_train models use one head size")
    cfg: dict[str, Any] = {"rope_theta": float(kv.get(f"{a}.rope.freq_base", 10000.0))}
    if head_dim != d_model // n_head or d_model % n_head:
        cfg["head_dim"] = head_dim
    rope_dim = kv.get(f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        cfg["rope_dim"] = rope_dim
    kind = kv.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(_need(kv, f"{a}.rope.scaling.factor"))}
    elif kind != "none":
        raise UserError(f"GGUF rope.scaling.type {kind!r} is not supported; supported: none, linear (and llama3)")
    if ROPE_FREQS in tensors:
        if "rope_scaling" in cfg:
            raise UserError(f"GGUF file has both rope.scaling.type and {ROPE_FREQS}; not supported")
        if (scaling := llama3_scaling_from_factors(tensors[ROPE_FREQS], rope_dim, cfg["rope_theta"])) is not None:
            cfg["rope_scaling"] = scaling
    if any(name in tensors for name in ROPE_FACTORS.values()):
        if "rope_scaling" in cfg:
            raise UserError("GGUF file has LongRoPE factors beside another RoPE scaling; not supported")
        cfg["rope_scaling"] = longrope_from_gguf(kv, tensors, a, rope_dim)
    return cfg


def longrope_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], a: str, rope_dim: int) -> dict:
    """Our LongRoPE scaling of llama.cpp's factors (a missing set: ones, as llama.cpp computes without it), its
    original context (default: the context, as llama.cpp) and attention factor (kept where it is not the default
    one of that context)."""
    context = int(_need(kv, f"{a}.context_length"))
    scaling: dict[str, Any] = {"type": "longrope"}
    for key, name in ROPE_FACTORS.items():
        factors = tensors[name].float().flatten() if name in tensors else torch.ones(rope_dim // 2)
        if factors.numel() != rope_dim // 2:
            raise UserError(f"GGUF {name} has {factors.numel()} entries; the rotary size needs {rope_dim // 2}")
        scaling[key] = factors.tolist()
    scaling["original_max_position_embeddings"] = int(kv.get(f"{a}.rope.scaling.original_context_length", context))
    attn = kv.get(f"{a}.rope.scaling.attn_factor")
    if attn is not None and not math.isclose(attn, rope_attention_factor(scaling, context), rel_tol=1e-6):
        scaling["attention_factor"] = float(attn)
    return scaling


def from_gguf(tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    c = gpt_config(config)
    fam = family(c.style)
    # rope_freqs is config (rope_scaling); zero biases of a bias-free model are the exporter's padding
    skip = {ROPE_FREQS, *ROPE_FACTORS.values()}
    if fam.gguf_needs_biases and not c.bias:
        skip |= {n for n in tensors if n.endswith(".bias")}
    items = ((n, tensors[n]) for n in tensors if n not in skip)
    top = dict(fam.gguf_top)
    try:
        parts, origin = ungroup(items, c, fam.gguf_block, top, LAYER, _permute(fam, c, inverse=True))
    except KeyError as e:
        raise UserError(f"GGUF tensor {e.args[0]!r} has no place in a {fam.name} model") from None
    if c.tie_embeddings:
        parts["lm_head.weight"], origin["lm_head.weight"] = parts["tok_embd.weight"], "token_embd.weight"
    if c.attention_bias:
        # HF Llama's attention_bias has o_proj's bias too; a file with q/k/v biases only gets zeros there.
        for i in range(c.n_layer):
            w = parts.get(f"blocks.{i}.attn.proj.weight")
            if w is not None:
                parts.setdefault(f"blocks.{i}.attn.proj.bias", torch.zeros(w.shape[0]))
    check_parts(parts, config, "GGUF file", origin)
    sd = from_parts(parts)
    for name in offset_norms(c):
        if name in sd:
            sd[name] = sd[name] - 1
    return sd
