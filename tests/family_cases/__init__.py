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
