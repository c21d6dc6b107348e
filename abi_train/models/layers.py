"""Building blocks shared by every model family: norms, RoPE, attention, MLP, the pre-norm block.

GPT-2, LLaMA, the ViT and both CLIP towers are all stacks of the same pre-norm ``Block``; the
families differ only in the options below (norm, MLP kind, biases, causal mask, RoPE, GQA).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_KERNELS = {
    "auto": None,  # PyTorch picks per call
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weight follows x (bf16 under trainer.bf16_residual): mixed dtypes miss the fused kernel.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """LayerNorm (with a bias unless ``bias`` is false) or RMSNorm (never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


def rope_cache(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """cos/sin table of shape (2, seq_len, head_dim) for the rotate-half (HF/NeoX) RoPE convention.

    llama.cpp's ``llama`` architecture rotates adjacent pairs instead; the GGUF exporter permutes the
    Q and K rows per head so both conventions compute the same attention.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by the first T positions of ``cache``."""
    cos, sin = cache[0, : x.shape[-2]].to(x.dtype), cache[1, : x.shape[-2]].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head attention with one fused QKV projection; grouped-query when n_kv_head < n_head."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int | None = None,
        bias: bool = True,
        causal: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"d_model={d_model}, n_head={n_head}, n_kv_head={n_kv_head} do not divide")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.causal, self.dropout = causal, dropout
        self.kernels: list[SDPBackend] | None = None  # None: PyTorch picks; see pin_attention_kernel
        # Rows: [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # The pin sits inside forward so torch.compile traces it (a context around the compiled call is not
        # seen by the graph).
        with sdpa_kernel(self.kernels) if self.kernels else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=self.causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GELU MLP (``fc`` -> GELU -> ``proj``) or SwiGLU (``down(silu(gate(x)) * up(x))``)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in ("gelu", "gelu_tanh", "swiglu"):
            raise ValueError(f"unknown mlp {kind!r}; valid: gelu, gelu_tanh, swiglu")
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(d_model, hidden, bias=bias)
            self.up = nn.Linear(d_model, hidden, bias=bias)
            self.down = nn.Linear(hidden, d_model, bias=bias)
        else:
            self.fc = nn.Linear(d_model, hidden, bias=bias)
            self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        approximate = "tanh" if self.kind == "gelu_tanh" else "none"
        return self.proj(F.gelu(self.fc(x), approximate=approximate))


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
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

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
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps, bias)
        self.attn = Attention(d_model, n_head, n_kv_head, bias=bias, causal=causal, dropout=dropout)
        self.norm2 = make_norm(norm, d_model, norm_eps, bias)
        self.mlp = MLP(d_model, ffn_hidden, kind=mlp, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.resid_dropout(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.resid_dropout(self.mlp(self.norm2(x))))


def pin_attention_kernel(model: nn.Module, kind: str) -> None:
    """Pin every attention layer of ``model`` to one SDPA kernel (a key of ATTENTION_KERNELS)."""
    backend = ATTENTION_KERNELS[kind]
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernels = None if backend is None else [backend]
