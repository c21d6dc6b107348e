"""LLM families as facts: one file each (``llama.py``, ``qwen3.py``, ``gemma3.py``, ...), read by everything that
turns the one decoder (``models.gpt``) into another program's terms.

A family file defines ``FAMILY = Family(...)``: the decoder switches it implies (``defaults``), how its Hugging
Face ``config.json`` maps onto the decoder's config and back, its HF and GGUF tensor-name tables, its llama.cpp
architecture and the metadata keys only it has. Nothing outside the family file branches on a family's name:
the HF adapter (``hf/llm.py``), the GGUF name map (``export/gguf_llm.py``), the PEFT and llama.cpp LoRA
exports read these facts. Adding a family is adding a file here (this package finds it) and its tests.

Name tables map a module of the other side to the *parts* of ours it holds, concatenated by rows
(``models.qkv``): ``attn.q``, ``attn.k``, ``attn.v`` are the row slices of our fused ``attn.qkv``, every other
part is our module of that name. HF's ``self_attn.q_proj`` is ``("attn.q",)``; Phi-3's fused
``self_attn.qkv_proj`` is ``("attn.q", "attn.k", "attn.v")`` and its ``mlp.gate_up_proj`` is
``("mlp.gate", "mlp.up")``.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

from abi_train.errors import UserError

if TYPE_CHECKING:
    from gguf import GGUFWriter

    from abi_train.models.gpt import GPTConfig

Table = Mapping[str, tuple[str, ...]]  # their module -> our parts, concatenated by rows


@dataclass(frozen=True)
class Family:
    name: str  # the decoder's ``model.style``
    # GPTConfig switches this family implies when a model config leaves them unset
    defaults: Mapping[str, Any]
    # --- Hugging Face ---
    hf_architectures: tuple[str, ...]  # config.json "architectures" values it reads (the first is written)
    # config.json -> GPTConfig kwargs ("arch", "style" and "name" are added by the caller); ``where`` names the
    # file in errors
    config_from_hf: Callable[[dict[str, Any], str], dict[str, Any]]
    # GPTConfig -> the family's own config.json keys (ids, dtype and tying are added by the caller)
    hf_config: Callable[[GPTConfig], dict[str, Any]]
    hf_block: Table  # inside ``{hf_layers}.N.``
    hf_top: Mapping[str, str]  # their module -> ours, outside the blocks
    hf_layers: str = "model.layers"
    hf_optional_prefix: str = ""  # a prefix some files leave out (GPT-2's "transformer.")
    hf_transposed: frozenset[str] = frozenset()  # their modules stored (in, out) (GPT-2's Conv1D)
    hf_needs_biases: bool = False  # their model always has biases: a bias-free one is written with zeros
    # --- GGUF (llama.cpp) ---
    gguf_architecture: str = ""
    gguf_block: Table = field(default_factory=dict)  # inside ``blk.N.``
    gguf_top: Mapping[str, str] = field(default_factory=dict)
    gguf_permute_qk: bool = False  # llama.cpp rotates adjacent pairs here: q/k rows are permuted per head
    gguf_needs_biases: bool = False
    # the family's own GGUF keys beyond the common ones (export/gguf_llm.py), and their inverse:
    # (kv, tensors, architecture) -> GPTConfig kwargs
    gguf_metadata: Callable[[GGUFWriter, GPTConfig], None] | None = None
    config_from_gguf: Callable[[Mapping[str, Any], Mapping[str, Any], str], dict[str, Any]] | None = None
    # why a model of this family has no form in a format ("hf" | "gguf"), or None: (GPTConfig, format) -> reason
    refuses: Callable[[GPTConfig, str], str | None] | None = None

    def refusal(self, cfg: GPTConfig, fmt: str) -> str | None:
        """Why a model of this family has no form in ``fmt`` ("hf" | "gguf"): a switch the family's own config
        cannot carry (found by mapping the config to its config.json and back), or the family's ``refuses``."""
        lost = self.unexpressed(cfg)
        if lost:
            shown = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in lost)
            return f"a style={self.name} model with {shown} has no {fmt.upper()} form: its family does not carry it"
        return self.refuses(cfg, fmt) if self.refuses else None

    def unexpressed(self, cfg: GPTConfig) -> list[str]:
        """The decoder settings of ``cfg`` that this family's config.json would lose (the export would run
        another model)."""
        from dataclasses import fields

        from abi_train.models.gpt import GPTConfig

        written = self.hf_config(cfg) | {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
        try:
            back = GPTConfig(style=self.name, **self.config_from_hf(written, f"the {self.name} config.json"))
        except UserError as e:
            return [str(e)]
        # free text and training-only options; a bias-free model written with zero biases computes the same
        ignored = {"name", "dropout"} | ({"bias"} if self.hf_needs_biases else set())
        return [
            f.name
            for f in fields(GPTConfig)
            if f.name not in ignored and _setting(back, f.name) != _setting(cfg, f.name)
        ]


def _setting(cfg: GPTConfig, key: str) -> Any:
    """A config value as it acts: a window or local RoPE base no layer uses is none, no query scale is head_dim."""
    if key in ("sliding_window", "rope_local_theta") and "sliding" not in cfg.layer_types:
        return None
    if key == "query_scale":
        return cfg.query_scale or cfg.head_dim
    return getattr(cfg, key)


@cache
def families() -> dict[str, Family]:
    """Every family file of this package, by name."""
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        fam = import_module(f"{__name__}.{info.name}").FAMILY
        found[fam.name] = fam
    return found


def family(name: str) -> Family:
    """The family a ``model.style`` names; an unknown one is a UserError listing the known."""
    known = families()
    if name not in known:
        raise UserError(f"model.style={name!r} is not valid; choose one of: {', '.join(sorted(known))}")
    return known[name]


def family_for_hf(architecture: str) -> Family | None:
    return next((f for f in families().values() if architecture in f.hf_architectures), None)


def family_for_gguf(architecture: str) -> Family | None:
    """The family a GGUF architecture is written by; where several share one (Mistral writes llama), the family
    of that name."""
    matches = [f for f in families().values() if f.gguf_architecture == architecture]
    return next((f for f in matches if f.name == architecture), matches[0] if matches else None)
