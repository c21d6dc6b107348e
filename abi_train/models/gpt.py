"""A decoder-only transformer in two styles, built from the shared ``layers.Block``.

- ``gpt2``: LayerNorm, learned positions (``pos_embd``), GELU MLP (``act``: the tanh approximation GPT-2 and
  llama.cpp compute, or exact as nanoGPT's), biases everywhere (or, with ``bias=False``, nowhere: nanoGPT's
  default), tied embeddings.
- ``llama``: RMSNorm, rotate-half RoPE (optionally scaled: Llama 3.1's ``llama3``, ``linear``), SwiGLU MLP,
  grouped-query attention, no biases (``attention_bias``: q/k/v/o biases, as HF Llama's option).
- ``qwen2``: llama with biases on the q/k/v projections only (Qwen2/2.5).

Parameter names (``tok_embd``, ``pos_embd``, ``blocks.N.*``, ``norm_f``, ``lm_head``) are what the
checkpoint stores and what ``abi_train.export.gguf_llm`` maps to llama.cpp's names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abi_train.errors import UserError
from abi_train.models.layers import ROPE_SCALINGS, Block, KVCache, make_norm, rope_at, rope_cache, segment_mask

STYLES = ("llama", "qwen2", "gpt2")
GPT2_ACTS = ("gelu_tanh", "gelu")
ROTARY_STYLES = ("llama", "qwen2")  # RMSNorm, RoPE, SwiGLU; no position table


@dataclass
class GPTConfig:
    style: str = "llama"  # llama | qwen2 | gpt2
    vocab_size: int | None = None  # embedding rows; the LLM task fills null from the tokenizer
    context_length: int = 128  # longest sequence; sizes gpt2's position table and the RoPE cache
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); None = n_head
    d_model: int = 64
    head_dim: int | None = None  # None: d_model / n_head
    ffn_hidden: int | None = None  # None: gpt2 4*d; llama 8/3*d rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base (llama/qwen2 styles)
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3" | "linear", "factor": ..., ...} (HF's keys)
    attention_bias: bool = False  # llama style: biases on q/k/v/o (HF Llama's attention_bias)
    tie_embeddings: bool = True  # lm_head shares tok_embd's weight
    bias: bool | None = None  # biases in linears and LayerNorms; None: the style's (gpt2 yes, llama no)
    act: str = "gelu_tanh"  # gpt2 style's GELU: gelu_tanh (GPT-2, HF gelu_new, llama.cpp) | gelu (exact, nanoGPT)
    dropout: float = 0.0
    name: str = "gpt"  # free text, written into GGUF's general.name

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise UserError(f"model.style={self.style!r} is not valid; choose one of: {', '.join(STYLES)}")
        if self.vocab_size is None:
            raise UserError("model.vocab_size is null; the LLM task sets it from the tokenizer")
        for key in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be a positive integer")
        self.n_kv_head = self.n_kv_head or self.n_head
        if (self.head_dim is None and self.d_model % self.n_head) or self.n_head % self.n_kv_head:
            raise UserError(
                f"model.d_model={self.d_model} must divide by n_head={self.n_head} (or set model.head_dim), "
                f"and n_head by n_kv_head={self.n_kv_head}"
            )
        self.head_dim = self.head_dim or self.d_model // self.n_head
        rotary = self.style in ROTARY_STYLES
        if rotary and self.head_dim % 2:
            raise UserError(f"model: RoPE needs an even head size, got head_dim={self.head_dim}")
        if not rotary and (self.head_dim * self.n_head != self.d_model or self.rope_scaling or self.attention_bias):
            raise UserError("model.head_dim, rope_scaling and attention_bias are for the llama and qwen2 styles")
        kind = (self.rope_scaling or {}).get("type")
        if kind is not None and kind not in ROPE_SCALINGS:
            raise UserError(f"model.rope_scaling.type={kind!r} is not supported; valid: {', '.join(ROPE_SCALINGS)}")
        if self.act not in GPT2_ACTS or (rotary and self.act != "gelu_tanh"):
            raise UserError(
                f"model.act={self.act!r} is not valid: the gpt2 style takes {' | '.join(GPT2_ACTS)}; "
                f"llama and qwen2 use SwiGLU (leave model.act unset)"
            )
        if self.bias is None:
            self.bias = self.style == "gpt2"
        elif self.bias and rotary:
            raise UserError(
                f"model.bias=true is not supported for style={self.style} (use attention_bias for q/k/v/o biases)"
            )
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model if self.style == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        llama = cfg.style in ROTARY_STYLES
        self.tok_embd = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if not llama:
            self.pos_embd = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                cfg.d_model,
                cfg.n_head,
                cfg.ffn_hidden,
                n_kv_head=cfg.n_kv_head,
                norm="rmsnorm" if llama else "layernorm",
                norm_eps=cfg.norm_eps,
                mlp="swiglu" if llama else cfg.act,
                bias=cfg.bias,
                dropout=cfg.dropout,
                head_dim=cfg.head_dim,
                qkv_bias=cfg.bias or cfg.attention_bias or cfg.style == "qwen2",
                proj_bias=cfg.bias or cfg.attention_bias,
            )
            for _ in range(cfg.n_layer)
        )
        self.norm_f = make_norm("rmsnorm" if llama else "layernorm", cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embd.weight
        # Recomputed on load (non-persistent), so checkpoints hold weights only.
        rope = rope_cache(cfg.context_length, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if llama else None
        self.register_buffer("rope", rope, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2*n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict[str, Any]:
        """Plain kwargs that rebuild this model through ``abi_train.models.build_model``."""
        return {"arch": "gpt", **asdict(self.cfg)}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once); optionally without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embd.weight.numel()
            n -= self.pos_embd.weight.numel() if hasattr(self, "pos_embd") else 0
        return n

    def flops_per_item(self) -> float:
        """Training FLOPs per token (the item of an LLM), PaLM (appendix B) / nanoGPT: 6*N + 12*L*d*T.

        N = parameters that take part in matmuls (blocks + lm_head; embedding lookups are free),
        6 = 2 forward + 4 backward per parameter; 12*L*d*T counts attention scores and the
        weighted sum of values over a full context T = context_length.
        """
        c = self.cfg
        n = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.context_length

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        labelled_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T); with ``targets``, the mean cross entropy
        over positions whose target is not -100. ``caches`` (one KVCache per block, for generation): ``idx``
        continues the positions they hold.

        Packed rows (several sequences in one row, data/sft.py): ``segments`` (B, T) numbers the sequences
        (a token attends only to the earlier tokens of its own segment) and ``positions`` (B, T) restarts at 0
        in each (RoPE or gpt2's position table at those positions). Without them the forward is unchanged.
        ``labelled_only`` (with targets): the lm_head and the loss run only where the target is not -100 (SFT
        labels a fraction of the tokens, and the lm_head is most of a small model's cost); that gather has a
        data-dependent shape (a graph break under torch.compile, a host sync on GPU)."""
        start = caches[0].length if caches else 0
        end = start + idx.shape[1]
        if end > self.cfg.context_length:
            raise ValueError(f"sequence length {end} exceeds context_length {self.cfg.context_length}")
        x = self.tok_embd(idx)
        rope = self.rope
        if positions is not None:
            rope = rope_at(rope, positions) if rope is not None else None
        if self.rope is None:
            x = x + self.pos_embd(torch.arange(start, end, device=idx.device) if positions is None else positions)
        mask = segment_mask(segments) if segments is not None else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches else None, mask)
        if targets is not None and labelled_only:
            keep = targets != -100
            return F.cross_entropy(self.lm_head(self.norm_f(x[keep])), targets[keep])
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        # No explicit .float(): under autocast cross_entropy upcasts internally, so no second full
        # fp32 copy of the (B*T, V) logits is kept alive by us.
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Sampled next tokens (B, 1) after ``idx`` (B, T), one at a time; temperature 0 is greedy.

        Keys and values are cached, so each token costs one position's forward. Once the context is full,
        every step recomputes the last context_length tokens (a sliding window, positions from 0).
        """
        context = self.cfg.context_length
        caches: list[KVCache] | None = [KVCache() for _ in self.blocks]
        logits = self(idx[:, -context:], caches=caches)[:, -1, :]
        for _ in range(max_new_tokens):
            nxt = self._sample(logits.float(), temperature, top_k, generator)
            yield nxt
            idx = torch.cat([idx, nxt], dim=1)
            if caches is not None and caches[0].length < context:
                logits = self(nxt, caches=caches)[:, -1, :]
            else:
                caches = None
                logits = self(idx[:, -context:])[:, -1, :]

    @staticmethod
    def _sample(
        logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``idx`` (B, T) with ``max_new_tokens`` sampled tokens appended (see ``stream``)."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, generator))
        return torch.cat([idx, *new], dim=1)


def build_gpt(**kwargs: Any) -> GPT:
    """Registered as arch ``gpt``; kwargs are ``GPTConfig`` fields (a model YAML minus ``arch``)."""
    unknown = sorted(set(kwargs) - {f.name for f in fields(GPTConfig)})
    if unknown:
        valid = ", ".join(f.name for f in fields(GPTConfig))
        raise UserError(f"unknown model key(s) {', '.join(unknown)} for arch gpt; valid: {valid}")
    return GPT(GPTConfig(**kwargs))
