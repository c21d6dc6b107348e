"""SmolLM3: Llama without RoPE on some layers (NoPE; SmolLM3-3B: every 4th, layers 3, 7, ..., 35).

HF's ``no_rope_layers`` holds 1 (RoPE) / 0 (NoPE) per layer, or is built from ``no_rope_layer_interval``;
ours is ``nope_layers``, the indices without RoPE. llama.cpp's smollm3 rotates adjacent pairs (its converter is
Llama's, which permutes q/k) and skips RoPE on every 4th layer, a step it hard-codes (no GGUF key): other NoPE
patterns have no GGUF form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abi_train.errors import UserError
from abi_train.models.families._common import (
    full_attention_only,
    gguf_bias_refusal,
    llama_config_from_hf,
    llama_hf_config,
    llama_like,
    sliding_refusal,
)

LLAMACPP_NOPE_STEP = 4  # llama.cpp's hparams.n_no_rope_layer_step for smollm3


def every(step: int, n_layer: int) -> list[int] | None:
    """The NoPE layers of one every ``step`` layers (the last of each group), as HF's no_rope_layer_interval."""
    return [i for i in range(n_layer) if (i + 1) % step == 0] or None


def config_from_hf(c: Mapping[str, Any], where: str) -> dict[str, Any]:
    full_attention_only(c, where)
    cfg = llama_config_from_hf(c, where) | {"attention_bias": bool(c.get("attention_bias", False))}
    flags = c.get("no_rope_layers")
    if flags is None:
        cfg["nope_layers"] = every(int(c.get("no_rope_layer_interval") or 4), cfg["n_layer"])
    elif not isinstance(flags, list) or len(flags) < cfg["n_layer"] or any(f not in (0, 1) for f in flags):
        raise UserError(f"{where}: no_rope_layers={flags!r} must hold a 1 (RoPE) or 0 (NoPE) for every layer")
    else:
        cfg["nope_layers"] = [i for i in range(cfg["n_layer"]) if not flags[i]] or None
    return cfg


def hf_config(cfg: Any) -> dict[str, Any]:
    nope = set(cfg.nope_layers or ())
    return llama_hf_config(cfg, "SmolLM3ForCausalLM", "smollm3") | {
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "no_rope_layers": [int(i not in nope) for i in range(cfg.n_layer)],
        "use_sliding_window": False,
        "sliding_window": None,
    }


def config_from_gguf(kv: Mapping[str, Any], tensors: Mapping[str, Any], arch: str) -> dict[str, Any]:
    return {"nope_layers": every(LLAMACPP_NOPE_STEP, kv[f"{arch}.block_count"])}


def refuses(cfg: Any, fmt: str) -> str | None:
    if fmt == "gguf" and cfg.nope_layers != every(LLAMACPP_NOPE_STEP, cfg.n_layer):
        return (
            f"a smollm3-style model with nope_layers={cfg.nope_layers} has no GGUF form: llama.cpp's smollm3 skips "
            f"RoPE on every {LLAMACPP_NOPE_STEP}th layer exactly ({every(LLAMACPP_NOPE_STEP, cfg.n_layer)})"
        )
    return gguf_bias_refusal(cfg, fmt, "smollm3") or sliding_refusal(cfg)


FAMILY = llama_like(
    name="smollm3",
    hf_architectures=("SmolLM3ForCausalLM",),
    config_from_hf=config_from_hf,
    hf_config=hf_config,
    gguf_architecture="smollm3",
    gguf_permute_qk=True,
    config_from_gguf=config_from_gguf,
    refuses=refuses,
)
