"""One decoder-only transformer with feature switches, built from the shared ``layers.Block``; each LLM family
(``models/families/<style>.py``: Llama, Qwen2/3, Gemma 2/3, Phi-3, Mistral, SmolLM3, GPT-2) is a set of those
switches plus its name tables, never a branch here.

The switches (``GPTConfig``; unset ones take the family's ``defaults``): the norm (LayerNorm or RMSNorm, with
Gemma's ``1 + w`` offset), learned positions (GPT-2) or rotate-half RoPE (optionally scaled: Llama 3.1's
``llama3``, ``linear``; partial as Phi-4-mini's ``rope_dim``; a second base for sliding layers as Gemma 3's
``rope_local_theta``; none on ``nope_layers`` as SmolLM3), a gated MLP (SwiGLU, GeGLU) or a plain GELU one,
biases (all, q/k/v/o, or q/k/v only), q/k RMSNorm over each head (Qwen3, Gemma 3), embeddings scaled by
sqrt(d_model) and norms after each branch (Gemma), soft-capped attention scores and final logits (Gemma 2),
a query scale apart from the head size, and a per-layer attention pattern (``layer_types``: full or sliding
window).

Parameter names (``tok_embd``, ``pos_embd``, ``blocks.N.*``, ``norm_f``, ``lm_head``) are what the checkpoint
stores and what the family tables map to other programs' names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from abi_train.errors import UserError
from abi_train.models import flex
from abi_train.models.families import family
from abi_train.models.layers import (
    ROPE_SCALINGS,
    Block,
    KVCache,
    causal_mask,
    lora_targets,
    make_norm,
    rope_at,
    rope_cache,
    segment_mask,
)

ACTS = ("silu", "gelu_tanh", "gelu")
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
LAYER_TYPES = ("full", "sliding")
MLP_KIND = {(True, "silu"): "swiglu", (True, "gelu"): "geglu", (True, "gelu_tanh"): "geglu_tanh"}
MLP_KIND |= {(False, "gelu"): "gelu", (False, "gelu_tanh"): "gelu_tanh"}


@dataclass
class GPTConfig:
    style: str = "llama"  # the family (models/families/<style>.py): its defaults fill the switches left unset
    vocab_size: int | None = None  # embedding rows; the LLM task fills null from the tokenizer
    context_length: int = 128  # longest sequence; sizes gpt2's position table and the RoPE cache
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); None = n_head
    d_model: int = 64
    head_dim: int | None = None  # None: d_model / n_head
    ffn_hidden: int | None = None  # None: 4*d for a plain MLP; 8/3*d rounded up to a multiple of 64 gated
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3" | "linear" | "longrope", ...} (HF's keys)
    attention_bias: bool = False  # biases on q/k/v/o (HF Llama's attention_bias)
    tie_embeddings: bool = True  # lm_head shares tok_embd's weight
    bias: bool | None = None  # biases in every linear and LayerNorm (GPT-2); None: the family's
    dropout: float = 0.0
    name: str = "gpt"  # free text, written into GGUF's general.name
    # --- switches; None: the family's default ---
    norm: str | None = None  # rmsnorm | layernorm
    norm_offset: bool | None = None  # RMSNorm scales by 1 + w (Gemma)
    positions: str | None = None  # rope | learned (GPT-2's position table)
    gated_mlp: bool | None = None  # down(act(gate(x)) * up(x)) (SwiGLU / GeGLU) or proj(act(fc(x)))
    act: str | None = None  # the MLP's activation: silu | gelu_tanh (GPT-2, Gemma) | gelu (exact)
    qkv_bias: bool | None = None  # biases on q/k/v alone (Qwen2)
    qk_norm: bool | None = None  # RMSNorm over each head's queries and keys (Qwen3, Gemma 3)
    embed_scale: bool | None = None  # embeddings times sqrt(d_model) (Gemma)
    sandwich_norm: bool | None = None  # a norm after each branch too (Gemma 2/3)
    attn_softcap: float | None = None  # scores -> c * tanh(s / c) (Gemma 2: 50)
    final_softcap: float | None = None  # logits -> c * tanh(l / c) (Gemma 2: 30)
    query_scale: float | None = None  # scores scaled by query_scale ** -0.5 (Gemma); None: head_dim
    sliding_window: int | None = None  # the window of "sliding" layers (a token sees itself and window - 1 before)
    layer_types: list[str] | None = None  # per layer: full | sliding; None: all sliding with a window, else full
    nope_layers: list[int] | None = None  # layers without RoPE (SmolLM3)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: as full ones
    rope_dim: int | None = None  # rotated features per head (partial rotary, Phi-4-mini); None: head_dim

    def __post_init__(self) -> None:
        for key, value in family(self.style).defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
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
        self._check_switches()
        self._check_positions()
        self._check_layers()
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64) if self.gated_mlp else 4 * self.d_model

    def _check_switches(self) -> None:
        for key, valid in (("norm", NORMS), ("positions", POSITIONS), ("act", ACTS)):
            if getattr(self, key) not in valid:
                raise UserError(f"model.{key}={getattr(self, key)!r} is not valid; choose one of: {', '.join(valid)}")
        if (self.gated_mlp, self.act) not in MLP_KIND:
            raise UserError(
                f"model.act={self.act!r} is not valid for a plain (gated_mlp=false) MLP; it takes gelu_tanh | gelu"
            )
        if self.bias is None:
            self.bias = False
        if self.bias and self.norm == "rmsnorm":
            raise UserError(
                f"model.bias=true is not supported for style={self.style} (RMSNorm has no bias; use attention_bias "
                "or qkv_bias for q/k/v/o biases)"
            )
        for key in ("attn_softcap", "final_softcap", "query_scale"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise UserError(f"model.{key}={getattr(self, key)} must be positive (or null: off)")

    def _check_positions(self) -> None:
        if self.positions == "learned":
            if self.head_dim * self.n_head != self.d_model or self.rope_scaling or self.nope_layers:
                raise UserError(
                    "model.head_dim, rope_scaling and nope_layers are for RoPE models (positions=rope), "
                    f"not style={self.style}"
                )
            return
        self.rope_dim = self.rope_dim or self.head_dim
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise UserError(f"model.rope_dim={self.rope_dim} must be even and at most head_dim={self.head_dim}")
        kind = (self.rope_scaling or {}).get("type")
        if kind is not None and kind not in ROPE_SCALINGS:
            raise UserError(f"model.rope_scaling.type={kind!r} is not supported; valid: {', '.join(ROPE_SCALINGS)}")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling.get(key) or ()) != self.rope_dim // 2:
                    raise UserError(f"model.rope_scaling.{key} must list rope_dim / 2 = {self.rope_dim // 2} factors")
            if int(self.rope_scaling.get("original_max_position_embeddings") or 0) <= 0:
                raise UserError("model.rope_scaling (longrope) needs a positive original_max_position_embeddings")

    def _check_layers(self) -> None:
        if self.layer_types is None:
            self.layer_types = ["sliding" if self.sliding_window else "full"] * self.n_layer
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
            raise UserError(
                f"model.layer_types={self.layer_types} must name one of {' | '.join(LAYER_TYPES)} for each of the "
                f"{self.n_layer} layers"
            )
        if "sliding" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise UserError("model.layer_types has sliding layers: set model.sliding_window to a positive window")
        self.nope_layers = sorted(set(self.nope_layers or ())) or None
        if self.nope_layers and not all(0 <= i < self.n_layer for i in self.nope_layers):
            raise UserError(f"model.nope_layers={self.nope_layers} must be layer indices below n_layer={self.n_layer}")

    @property
    def mlp_kind(self) -> str:
        return MLP_KIND[(self.gated_mlp, self.act)]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embd = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embd = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                cfg.d_model,
                cfg.n_head,
                cfg.ffn_hidden,
                n_kv_head=cfg.n_kv_head,
                norm=cfg.norm,
                norm_eps=cfg.norm_eps,
                mlp=cfg.mlp_kind,
                bias=cfg.bias,
                dropout=cfg.dropout,
                head_dim=cfg.head_dim,
                qkv_bias=cfg.bias or cfg.attention_bias or cfg.qkv_bias,
                proj_bias=cfg.bias or cfg.attention_bias,
                norm_offset=cfg.norm_offset,
                sandwich=cfg.sandwich_norm,
                qk_norm=cfg.qk_norm,
                scale=cfg.query_scale**-0.5 if cfg.query_scale else None,
                softcap=cfg.attn_softcap,
            )
            for _ in range(cfg.n_layer)
        )
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embd.weight
        # Recomputed on load (non-persistent), so checkpoints hold weights only.
        rope = local = None
        if cfg.positions == "rope":
            rope = rope_cache(cfg.context_length, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_local_theta is not None:
                local = rope_cache(cfg.context_length, cfg.rope_dim, cfg.rope_local_theta)
        # flex_attention for packed documents, windows and soft-caps (models/flex.py): off | compiled (only
        # inside torch.compile, where it is fast) | on; set by the trainer (trainer.attention)
        self.flex_attention = "off"
        self.register_buffer("rope", rope, persistent=False)
        self.register_buffer("rope_local", local, persistent=False)
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

    def lora_targets(self) -> list[str]:
        return lora_targets(self)

    def freeze_groups(self) -> dict[str, list[str]]:
        """Named fnmatch patterns for ``trainer.freeze``: ``embeddings`` (token and position tables; a tied head
        is the same tensor), ``blocks``, ``head`` (final norm and an untied lm_head)."""
        return {"embeddings": ["tok_embd.*", "pos_embd.*"], "blocks": ["blocks.*"], "head": ["norm_f.*", "lm_head.*"]}

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
        weighted sum of values over a full context T = context_length (a sliding layer's: its window).
        """
        c = self.cfg
        n = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        seen = [min(c.sliding_window, c.context_length) if t == "sliding" else c.context_length for t in c.layer_types]
        return 6 * n + 12 * c.n_head * c.head_dim * sum(seen)

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
        x = self.hidden(idx, caches, positions, segments)
        if targets is not None and labelled_only:
            keep = targets != -100
            return F.cross_entropy(self.logits(x[keep]), targets[keep])
        logits = self.logits(x)
        if targets is None:
            return logits
        # No explicit .float(): under autocast cross_entropy upcasts internally, so no second full
        # fp32 copy of the (B*T, V) logits is kept alive by us.
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    def hidden(
        self,
        idx: torch.Tensor,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output (B, T, d_model), before the final norm (see ``forward``)."""
        c = self.cfg
        start = caches[0].length if caches else 0
        end = start + idx.shape[1]
        if end > c.context_length:
            raise ValueError(f"sequence length {end} exceeds context_length {c.context_length}")
        x = self.tok_embd(idx)
        if c.embed_scale:
            x = x * torch.tensor(c.d_model**0.5, dtype=x.dtype)  # in the activations' dtype, as Gemma rounds it
        tables = {"full": self.rope, "sliding": self.rope_local if self.rope_local is not None else self.rope}
        if positions is not None and self.rope is not None:
            tables = {kind: rope_at(t, positions) for kind, t in tables.items()}
        if self.rope is None:
            x = x + self.pos_embd(torch.arange(start, end, device=idx.device) if positions is None else positions)
        masks = self._masks(idx.shape[1], end, segments, idx.device)
        x = self.drop(x)
        nope = set(c.nope_layers or ())
        for i, (block, kind) in enumerate(zip(self.blocks, c.layer_types, strict=True)):
            x = block(x, None if i in nope else tables[kind], caches[i] if caches else None, masks[kind])
        return x

    def _masks(
        self, queries: int, keys: int, segments: torch.Tensor | None, device: torch.device
    ) -> dict[str, torch.Tensor | BlockMask | None]:
        """The attention mask of full and sliding layers (None: plain causal, SDPA's own); flex_attention's
        block masks where ``flex_attention`` is on and a layer needs more than plain causal attention."""
        window = self.cfg.sliding_window if "sliding" in self.cfg.layer_types else None
        if self.flex_attention == "on" or (self.flex_attention == "compiled" and torch.compiler.is_compiling()):
            capped = self.cfg.attn_softcap is not None
            batch = segments.shape[0] if segments is not None else 1
            plain = segments is None and queries == keys
            full = None if plain and not capped else flex.document_mask(batch, queries, keys, device, None, segments)
            needs_window = window is not None and keys > window
            sliding = flex.document_mask(batch, queries, keys, device, window, segments) if needs_window else full
            return {"full": full, "sliding": sliding}
        if segments is not None:
            full = segment_mask(segments)
            sliding = segment_mask(segments, window) if window and keys > window else full
            return {"full": full, "sliding": sliding}
        full = causal_mask(queries, keys, device=device) if 1 < queries < keys else None  # a cache filled further
        sliding = causal_mask(queries, keys, window, device) if window and keys > window else full
        return {"full": full, "sliding": sliding}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states ``h`` (any leading shape): final norm, lm_head, the soft-cap."""
        logits = self.lm_head(self.norm_f(h))
        cap = self.cfg.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

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


def gpt_config(config: dict[str, Any]) -> GPTConfig:
    """The resolved config (every switch set) of builder kwargs (``model.config``, a checkpoint's model_config)."""
    return GPTConfig(**{k: v for k, v in config.items() if k != "arch"})


def build_gpt(**kwargs: Any) -> GPT:
    """Registered as arch ``gpt``; kwargs are ``GPTConfig`` fields (a model YAML minus ``arch``)."""
    unknown = sorted(set(kwargs) - {f.name for f in fields(GPTConfig)})
    if unknown:
        valid = ", ".join(f.name for f in fields(GPTConfig))
        raise UserError(f"unknown model key(s) {', '.join(unknown)} for arch gpt; valid: {valid}")
    return GPT(GPTConfig(**kwargs))
