"""One file per LLM family: the tiny random transformers configs tests/test_families.py checks it with.

Each file defines ``CASES = {name: FamilyCase(...)}``; test_families.py finds them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FamilyCase:
    model_class: str  # transformers class, e.g. "Qwen3ForCausalLM"
    config_class: str  # e.g. "Qwen3Config"
    config: dict[str, Any]  # its kwargs: tiny, with the family's features on (a window shorter than the test text)
    # overrides that make every matmul's input width a multiple of 256 (llama.cpp's K-quants need it)
    wide: dict[str, Any] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ("all",)
    gguf: bool = True  # llama.cpp runs this family
    # our GGUF export refuses this case (llama.cpp cannot compute it): a regex of that one-line UserError; the
    # llama.cpp checks then skip it and test_families checks the refusal instead
    gguf_refuses: str = ""
    # llama.cpp's adapter over the base equals its merged file to 1e-4; False where llama.cpp computes the MLP's
    # activation from an fp16 table (its CPU GELU: the input rounded to fp16), so the f32 rounding apart between
    # W x + B A x and (W + B A) x flips table entries (~3e-4); the adapter is then checked against ours only
    adapter_exact: bool = True
