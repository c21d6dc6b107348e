"""Building blocks shared by every model family: norms, RoPE, attention, MLP, the pre-norm block.

GPT-2, LLaMA, the ViT and both CLIP towers are all stacks of the same pre-norm ``Block``; the
families differ only in the options below (norm, MLP kind, biases, causal mask, RoPE, GQA).
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from abi_train.models import flex

ATTENTION_KERNELS = {
    "auto": None,  # PyTorch picks per call
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "flex": None,  # masked / soft-capped layers through flex_attention (models/flex.py), the rest as auto
}


class RMSNorm(nn.Module):
    """RMSNorm scaled by ``weight``, or by ``1 + weight`` with ``offset`` (Gemma's form, whose stored weight
    starts at zero)."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: bool = False) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight follows x (bf16 under trainer.bf16_residual): mixed dtypes miss the fused kernel.
        weight = 1.0 + self.weight.float() if self.offset else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, offset: bool = False) -> nn.Module:
    """LayerNorm (with a bias unless ``bias`` is false) or RMSNorm (never a bias; ``offset``: scaled by 1 + w)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, offset)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


ROPE_SCALINGS = ("linear", "llama3", "longrope")


def longrope_factors(scaling: dict, context: int) -> list[float]:
    """LongRoPE's (Phi-3/4) per-frequency divisors for a table of ``context`` positions. transformers takes
    ``long_factor`` for a forward longer than ``original_max_position_embeddings``, ``short_factor`` otherwise;
    our table is built once for the whole context, so it takes ``long_factor`` when the context is longer (as
    llama.cpp chooses by its context size): transformers' numbers on any sequence past the original length."""
    longer = context > int(scaling["original_max_position_embeddings"])
    return [float(f) for f in scaling["long_factor" if longer else "short_factor"]]


def rope_attention_factor(scaling: dict | None, context: int) -> float:
    """What cos and sin are multiplied by: LongRoPE's ``attention_factor``, by default (as transformers)
    sqrt(1 + ln(s) / ln(original)) with s = ``factor`` or context / original, 1 for s <= 1; 1 for other RoPEs."""
    if (scaling or {}).get("type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    s = float(scaling.get("factor") or context / original)
    return math.sqrt(1 + math.log(s) / math.log(original)) if s > 1 else 1.0


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None, context: int | None = None
) -> torch.Tensor:
    """The head_dim/2 RoPE inverse frequencies, with Hugging Face's ``rope_scaling`` applied:
    ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+) divides the low frequencies
    by ``factor``, keeps the high ones and interpolates between (``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``); ``longrope`` divides each by its factor of ``longrope_factors``
    (which needs the table's ``context``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("type")
    if kind is None:
        return inv_freq
    if kind == "longrope":
        if context is None:
            raise ValueError("longrope frequencies depend on the context length: pass context")
        return inv_freq / torch.tensor(longrope_factors(scaling, context), dtype=torch.float32)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unknown rope scaling {kind!r}; valid: {', '.join(ROPE_SCALINGS)}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cache(
    seq_len: int, head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """cos/sin table of shape (2, seq_len, head_dim) for the rotate-half (HF/NeoX) RoPE convention; ``seq_len``
    is the model's context (LongRoPE picks its factors and attention factor by it).

    llama.cpp's ``llama`` architecture rotates adjacent pairs instead; the GGUF exporter permutes the
    Q and K rows per head so both conventions compute the same attention.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, seq_len).to(device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()]) * rope_attention_factor(scaling, seq_len)


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by the first T positions of ``cache`` (2, T', R), or by a table
    already taken at each token's own position (2, B, 1, T, R; packed sequences, see ``rope_at``). A table
    narrower than the head (R < D, partial rotary as Phi-3/4) rotates the first R features and passes the rest."""
    if cache.ndim == 5:
        cos, sin = cache[0].to(x.dtype), cache[1].to(x.dtype)
    else:
        cos, sin = cache[0, : x.shape[-2]].to(x.dtype), cache[1, : x.shape[-2]].to(x.dtype)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cache), x[..., rotary:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_at(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The cos/sin table (2, T', D) taken at ``positions`` (B, T): (2, B, 1, T, D), broadcast over heads."""
    return cache[:, positions].unsqueeze(2)


def segment_mask(segments: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, T) attention mask of packed rows: a token sees the earlier tokens (and itself) of its
    own segment only (and, with ``window``, only the last ``window`` of them). ``segments`` (B, T) holds one id
    per packed sequence (padding: an id of its own)."""
    t = segments.shape[1]
    return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1) & causal_mask(t, t, window, segments.device)


def causal_mask(queries: int, keys: int, window: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (queries, keys) mask of the last ``queries`` positions of ``keys``: each sees itself and the
    positions before it, with ``window`` only the last ``window`` (itself included), as HF and llama.cpp count."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    allowed = k <= q
    return allowed & (q - k < window) if window is not None else allowed


class KVCache:
    """One attention layer's keys and values of every position seen so far, for incremental decoding: a prompt
    fills it at once, then each new token attends to all of it."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection; grouped-query when n_kv_head < n_head.

    ``head_dim`` defaults to d_model / n_head (some models set it apart, e.g. Gemma); ``qkv_bias`` and
    ``proj_bias`` default to ``bias`` (Qwen2 has biases on q/k/v only). ``qk_norm``: an RMSNorm over each
    head's queries and keys before RoPE (Qwen3, Gemma 3; ``norm_offset``: Gemma's 1 + w). ``scale``: the
    score scale (default 1/sqrt(head_dim); Gemma's query_pre_attn_scalar). ``softcap``: scores pass through
    softcap * tanh(s / softcap) before the softmax (Gemma 2), which SDPA cannot express: those layers compute
    attention themselves.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int | None = None,
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_offset: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if (head_dim is None and d_model % n_head) or n_head % n_kv_head:
            raise ValueError(f"d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head} do not divide")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim or d_model // n_head
        self.causal, self.dropout, self.scale, self.softcap = causal, dropout, scale, softcap
        self.kernels: list[SDPBackend] | None = None  # None: PyTorch picks; see pin_attention_kernel
        # Rows: [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias if proj_bias is None else proj_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_eps, norm_offset)
            self.k_norm = RMSNorm(self.head_dim, norm_eps, norm_offset)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """``mask`` (boolean, broadcast to (B, H, T, T_keys), True = attend; e.g. ``segment_mask`` or a sliding
        window's ``causal_mask``; or a flex_attention ``BlockMask``) replaces the causal mask; ``rope`` is then
        usually the per-token table of ``rope_at``. With a filled ``cache``, ``x`` holds the next token(s) and
        sees every cached position unless ``mask`` says otherwise."""
        start = 0 if cache is None else cache.length  # positions already in the cache
        if start and x.shape[1] > 1 and self.causal and mask is None:
            raise ValueError("a filled KV cache is extended one token at a time")
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        # Heads out of the feature dim, in front of time: SDPA's (B, H, T, D). einops compiles to the same
        # view + transpose (no graph break); in eager mode it adds ~8 us per call on the host.
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", d=self.head_dim) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            table = rope if rope.ndim == 5 else rope[:, start:]
            q, k = apply_rope(q, table), apply_rope(k, table)
        if cache is not None:
            k, v = cache.extend(k, v)
        causal = self.causal and not start and mask is None  # one new token sees every cached position
        if isinstance(mask, BlockMask):  # the decoder's flex_attention path (models/flex.py)
            y = flex.attend(q, k, v, mask, self.scale, self.softcap)
        elif self.softcap is not None:
            y = self._capped_attention(q, k, v, mask, causal)
        else:
            # The pin sits inside forward so torch.compile traces it (a context around the compiled call is not
            # seen by the graph).
            with sdpa_kernel(self.kernels) if self.kernels else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=causal,
                    dropout_p=self.dropout if self.training else 0.0,
                    scale=self.scale,
                    enable_gqa=self.n_kv_head != self.n_head,
                )
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))

    def lora_slices(self) -> dict[str, tuple[str, dict[str, tuple[int, int]]]]:
        """LoRA target -> (child linear, {target: its rows}): q, k, v are row slices of the fused ``qkv``."""
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        return {**{t: ("qkv", {t: r}) for t, r in rows.items()}, "o": ("proj", {"o": (0, self.proj.out_features)})}

    def _capped_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """Soft-capped scores (Gemma 2), softmax in fp32."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = (q @ k.transpose(-2, -1)).float() * scale
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if causal:
            mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), self.dropout if self.training else 0.0)
        return weights.to(v.dtype) @ v


MLP_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu", "geglu_tanh")
GATED_MLPS = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    """GELU MLP (``fc`` -> GELU -> ``proj``) or a gated one (``down(act(gate(x)) * up(x))``: SwiGLU with SiLU,
    GeGLU with the exact or tanh GELU, as Gemma).

    GELU comes exact (``gelu``), in the tanh form (``gelu_tanh``, GPT-2) or as OpenAI CLIP's
    ``quick_gelu``, x * sigmoid(1.702 x)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown mlp {kind!r}; valid: {', '.join(MLP_KINDS)}")
        self.kind = kind
        if self.gated:
            self.gate = nn.Linear(d_model, hidden, bias=bias)
            self.up = nn.Linear(d_model, hidden, bias=bias)
            self.down = nn.Linear(hidden, d_model, bias=bias)
        else:
            self.fc = nn.Linear(d_model, hidden, bias=bias)
            self.proj = nn.Linear(hidden, d_model, bias=bias)

    @property
    def gated(self) -> bool:
        return self.kind in GATED_MLPS

    def lora_slices(self) -> dict[str, tuple[str, dict[str, tuple[int, int]]]]:
        """LoRA target -> (child linear, {target: all its rows}); a GELU MLP's fc / proj answer to up / down."""
        names = {"gate": "gate", "up": "up", "down": "down"} if self.gated else {"up": "fc", "down": "proj"}
        return {t: (child, {t: (0, getattr(self, child).out_features)}) for t, child in names.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(GATED_MLPS[self.kind](self.gate(x)) * self.up(x))
        h = self.fc(x)
        if self.kind == "quick_gelu":
            return self.proj(h * torch.sigmoid(1.702 * h))
        return self.proj(F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). With ``sandwich`` (Gemma 2/3)
    each branch's output is normed again before it joins the residual stream (``post_attn_norm``,
    ``post_mlp_norm``). ``attention`` holds the options of ``Attention`` beyond the shared ones."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        ffn_hidden: int,
        n_kv_head: int | None = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        mlp: str = "gelu",
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
        mlp_bias: bool | None = None,
        norm_offset: bool = False,
        sandwich: bool = False,
        **attention: Any,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps, bias, norm_offset)
        self.attn = Attention(
            d_model,
            n_head,
            n_kv_head,
            bias,
            causal,
            dropout,
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            norm_eps=norm_eps,
            norm_offset=norm_offset,
            **attention,
        )
        self.norm2 = make_norm(norm, d_model, norm_eps, bias, norm_offset)
        self.mlp = MLP(d_model, ffn_hidden, kind=mlp, bias=bias if mlp_bias is None else mlp_bias)
        if sandwich:
            self.post_attn_norm = make_norm(norm, d_model, norm_eps, bias, norm_offset)
            self.post_mlp_norm = make_norm(norm, d_model, norm_eps, bias, norm_offset)
        self.resid_dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.norm1(x), rope, cache, mask)
        if hasattr(self, "post_attn_norm"):
            h = self.post_attn_norm(h)
        x = x + self.drop_path(self.resid_dropout(h))
        h = self.mlp(self.norm2(x))
        if hasattr(self, "post_mlp_norm"):
            h = self.post_mlp_norm(h)
        return x + self.drop_path(self.resid_dropout(h))


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_targets(model: nn.Module) -> list[str]:
    """The LoRA targets ``model``'s attention and MLP layers offer, in LORA_TARGETS order."""
    found = {t for m in model.modules() if isinstance(m, (Attention, MLP)) for t in m.lora_slices()}
    return [t for t in LORA_TARGETS if t in found]


def pin_attention_kernel(model: nn.Module, kind: str, compiled_on_cuda: bool = False) -> None:
    """Pin every attention layer of ``model`` to one SDPA kernel (a key of ATTENTION_KERNELS). ``flex`` runs
    masked and soft-capped attention through flex_attention always (``auto``: where the model is compiled on
    CUDA, the only place it is fast and has a backward), plain causal attention through SDPA's pick."""
    backend = ATTENTION_KERNELS[kind]
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernels = None if backend is None else [backend]
    if hasattr(model, "flex_attention"):
        model.flex_attention = "on" if kind == "flex" else "compiled" if kind == "auto" and compiled_on_cuda else "off"
