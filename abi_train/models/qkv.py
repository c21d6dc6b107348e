"""Our decoder's state dict in *parts*, and parts grouped into another program's tensors: the one place that
splits and fuses the QKV projection, for HF, GGUF, PEFT and LoRA alike.

Our attention has one fused ``attn.qkv`` (rows [q | k | v]); other programs store q, k and v apart (HF Llama,
llama.cpp's llama) or fused the same way (Phi-3, GPT-2), and some fuse the MLP's gate and up (Phi-3). A name
table (``models.families``) maps each of their tensors to the parts of ours it holds; this module does the
row arithmetic both ways, and the per-head row permutation llama.cpp's ``llama`` RoPE needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from abi_train.errors import UserError

QKV_PARTS = ("attn.q", "attn.k", "attn.v")
LORA_PARTS = {  # a LoRA target -> the part it adapts (a gated MLP has gate/up/down; a GELU MLP's up/down)
    "q": "attn.q",
    "k": "attn.k",
    "v": "attn.v",
    "o": "attn.proj",
    "gate": "mlp.gate",
    "up": "mlp.up",
    "down": "mlp.down",
}
UNGATED = {"mlp.up": "mlp.fc", "mlp.down": "mlp.proj"}  # a GELU MLP's modules for those parts
BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def part_rows(config: Any, part: str) -> int:
    """Rows of one part in our weights (``config``: a GPTConfig)."""
    if part == "attn.q":
        return config.n_head * config.head_dim
    if part in ("attn.k", "attn.v"):
        return config.n_kv_head * config.head_dim
    if part in ("mlp.gate", "mlp.up"):
        return config.ffn_hidden
    raise KeyError(part)


def split_qkv(t: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.split([part_rows(config, p) for p in QKV_PARTS]))  # type: ignore[return-value]


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [0..d/2 | d/2..d] (rotate-half RoPE, ours and HF's) to interleaved [0, d/2, 1, d/2+1, ...]
    (llama.cpp's ``llama``, adjacent pairs), as llama.cpp's converter's ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(config: Any) -> dict[str, int]:
    """The parts whose rows rotate under RoPE, with their head counts (for ``permute_rope``)."""
    return {"attn.q": config.n_head, "attn.k": config.n_kv_head}


def to_parts(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Our state dict with every ``blocks.N.attn.qkv.*`` split into ``blocks.N.attn.{q,k,v}.*``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = BLOCK_NAME.match(name)
        if m and m.group(2) == "attn.qkv":
            for part, piece in zip(QKV_PARTS, split_qkv(t, config), strict=True):
                out[f"blocks.{m.group(1)}.{part}.{m.group(3)}"] = piece
        else:
            out[name] = t
    return out


def from_parts(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_parts``: q, k and v of a block fused into ``attn.qkv``; a lacking one is named."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in parts.items():
        m = BLOCK_NAME.match(name)
        if m and m.group(2) in QKV_PARTS:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
        else:
            out[name] = t
    for (layer, kind), pieces in fused.items():
        lacking = [p for p in QKV_PARTS if p not in pieces]
        if lacking:
            raise UserError(f"the weights lack {lacking[0]} of block {layer}'s attention ({kind})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([pieces[p] for p in QKV_PARTS])
    return out


def add_zero_biases(parts: dict[str, torch.Tensor]) -> None:
    """Zero biases beside every block and final-norm weight lacking one, for formats whose model always has
    biases (HF and llama.cpp GPT-2): a bias-free model computes the same with zeros."""
    for name, t in list(parts.items()):
        if name.endswith(".weight") and (BLOCK_NAME.match(name) or name == "norm_f.weight"):
            parts.setdefault(name.removesuffix("weight") + "bias", torch.zeros(t.shape[0], dtype=t.dtype))


def our_module(part: str, gated: bool) -> str:
    """The module of ours that holds ``part`` (a GELU MLP's up/down are ``fc``/``proj``)."""
    return part if gated else UNGATED.get(part, part)


def group(
    parts: Mapping[str, torch.Tensor],
    config: Any,
    block: Mapping[str, tuple[str, ...]],
    top: Mapping[str, str],
    layer_prefix: Callable[[str], str],
    transform: Callable[[str, str, str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Parts (``to_parts``) as another program's tensors: each of its block modules the row concatenation of
    the parts the table gives it (``block``; ``top`` renames the rest). ``transform(their_module, part, kind, t)``
    adjusts a part first (a RoPE permutation, a transpose). A part the table does not place is a KeyError."""
    gated = config.gated_mlp
    inverse = {our_module(p, gated): theirs for theirs, ps in block.items() for p in ps}
    out: dict[str, torch.Tensor] = {}
    placed: set[str] = set()
    for theirs, ps in block.items():
        for layer in range(config.n_layer):
            for kind in ("weight", "bias"):
                names = [f"blocks.{layer}.{our_module(p, gated)}.{kind}" for p in ps]
                present = [n for n in names if n in parts]
                if not present:
                    continue
                if len(present) != len(names):
                    raise KeyError(f"{theirs}: only some of {', '.join(names)} exist")
                pieces = [
                    transform(theirs, p, kind, parts[n]) if transform else parts[n]
                    for p, n in zip(ps, names, strict=True)
                ]
                out[f"{layer_prefix(str(layer))}{theirs}.{kind}"] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
                placed.update(names)
    for name, t in parts.items():
        if name in placed:
            continue
        m = BLOCK_NAME.match(name)
        if m:
            raise KeyError(f"{name}: no tensor of the table holds {m.group(2)} ({sorted(inverse)})")
        stem, _, kind = name.rpartition(".")
        out[f"{top[stem]}.{kind}"] = t
    return out


def ungroup(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Any,
    block: Mapping[str, tuple[str, ...]],
    top: Mapping[str, str],
    layer_pattern: re.Pattern[str],
    transform: Callable[[str, str, str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The inverse of ``group``: (parts, origin: each part's name -> their tensor's name). ``layer_pattern``
    matches their block tensors as (layer, module, kind); ``top`` maps their other modules to ours. A name
    neither table knows raises KeyError(name)."""
    gated = config.gated_mlp
    parts: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors:
        m = layer_pattern.match(name)
        if m and m.group(2) in block:
            layer, theirs, kind = m.groups()
            ps = block[theirs]
            rows = [part_rows(config, p) for p in ps] if len(ps) > 1 else [t.shape[0]]
            if sum(rows) != t.shape[0]:
                raise UserError(f"tensor {name} has shape {tuple(t.shape)}; the config implies {sum(rows)} rows")
            pieces = t.split(rows)
            for p, piece in zip(ps, pieces, strict=True):
                ours = f"blocks.{layer}.{our_module(p, gated)}.{kind}"
                parts[ours] = transform(theirs, p, kind, piece) if transform else piece
                origin[ours] = name
            continue
        stem, _, kind = name.rpartition(".")
        if m or stem not in top:
            raise KeyError(name)
        parts[f"{top[stem]}.{kind}"], origin[f"{top[stem]}.{kind}"] = t, name
    return parts, origin


def check_parts(
    parts: Mapping[str, torch.Tensor], config: dict[str, Any], source: str, origin: Mapping[str, str]
) -> None:
    """``weights.check_weights`` on parts, before they are fused: an error names q, k or v as the source does."""
    from abi_train.models import build_model
    from abi_train.models.gpt import GPT
    from abi_train.weights import check_weights

    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, GPT)
    expected = {k: tuple(v.shape) for k, v in to_parts(model.state_dict(), model.cfg).items()}
    check_weights(dict(parts), expected, source, origin)


def group_lora(
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: Any,
    block: Mapping[str, tuple[str, ...]],
    layer_prefix: Callable[[str], str],
    transform_b: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """LoRA updates of our parts (``adapters``: ``blocks.N.<part>`` -> (A, B), the part's rows only) as updates
    of another program's modules: their module -> (A, B, n). A module holding one adapted part takes its A and
    B (n = 1); one holding several (q/k/v in one fused tensor, Phi-3's gate_up) takes them as one LoRA of rank
    n * r, A stacked and B block-diagonal (zero rows for parts without an update): exactly the same update.
    ``transform_b(part, B)`` adjusts a part's B first (llama.cpp's RoPE row permutation)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for theirs, ps in block.items():
        for layer in range(config.n_layer):
            adapted = [p for p in ps if f"blocks.{layer}.{p}" in adapters]
            if not adapted:
                continue
            pairs = {p: adapters[f"blocks.{layer}.{p}"] for p in adapted}
            if transform_b is not None:
                pairs = {p: (a, transform_b(p, b)) for p, (a, b) in pairs.items()}
            name = f"{layer_prefix(str(layer))}{theirs}"
            if len(ps) == 1:
                out[name] = (*pairs[ps[0]], 1)
                continue
            rank = pairs[adapted[0]][0].shape[0]
            rows = [part_rows(config, p) for p in ps]
            big_b = torch.zeros(sum(rows), len(adapted) * rank)
            offset, column = 0, 0
            for p, n in zip(ps, rows, strict=True):
                if p in pairs:
                    big_b[offset : offset + n, column : column + rank] = pairs[p][1]
                    column += rank
                offset += n
            out[name] = (torch.cat([pairs[p][0] for p in adapted]), big_b, len(adapted))
    return out
