"""Phi-3 / Phi-4-mini beyond the shared family harness (tests/test_families.py with tests/family_cases/phi3.py):
the shipped Phi-4-mini shape and LongRoPE tables against transformers', and what the phi3 family reads and
refuses."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_hf_llm import tiny_tokenizer

from abi_train.cli import config_dir
from abi_train.errors import UserError
from abi_train.export import export_gguf
from abi_train.models import build_model
from abi_train.models.families import family
from abi_train.models.gpt import GPTConfig
from abi_train.models.layers import rope_attention_factor, rope_cache, rope_frequencies

transformers = pytest.importorskip("transformers")
PHI4 = yaml.safe_load((config_dir() / "model" / "phi4-mini.yaml").read_text())
META = {"family": "llm", "step": 0}


def phi3_config(**kwargs) -> transformers.Phi3Config:
    return transformers.Phi3Config(pad_token_id=None, bos_token_id=None, eos_token_id=None, **kwargs)


def test_phi4_mini_is_phi_4_mini_instruct():
    """configs/model/phi4-mini.yaml is Phi-4-mini-instruct: transformers' parameter count from its config (both on
    the meta device), GQA's shape, and its LongRoPE frequencies and attention factor at the full context."""
    scaling = PHI4["rope_scaling"]
    meta = phi3_config(vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                       original_max_position_embeddings=4096, partial_rotary_factor=0.75, rope_theta=10000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True,
                       rope_scaling={k: scaling[k] for k in ("type", "short_factor", "long_factor")})  # fmt: skip
    with torch.device("meta"):
        ours, theirs = build_model(PHI4), transformers.Phi3ForCausalLM(meta)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights once)
    assert count(ours) == count(theirs) == 3_836_021_760
    assert ours.blocks[0].attn.qkv.weight.shape == (3072 + 2 * 1024, 3072)  # 24 query heads, 8 kv heads of 128
    assert ours.rope.shape == (2, 131072, 96)
    want, attention = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](meta, "cpu", seq_len=131072)
    torch.testing.assert_close(rope_frequencies(96, 10000.0, scaling, 131072), want.float())
    assert rope_attention_factor(scaling, 131072) == pytest.approx(attention, rel=1e-12)


@pytest.mark.parametrize("context", [16, 64])
def test_longrope_table_is_transformers(context):
    """Our fixed table at ``context`` is transformers' rotary embedding over a sequence that long: the short
    factors (and no attention factor) up to original_max_position_embeddings, the long ones past it."""
    scaling = {"type": "longrope", "short_factor": [1.0, 1.2, 1.5], "long_factor": [1.0, 3.0, 9.0]}
    config = phi3_config(
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=context,
        original_max_position_embeddings=16,
        partial_rotary_factor=0.75,
        rope_scaling=dict(scaling),  # transformers fills in its own keys
    )
    rotary = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1), torch.arange(context)[None])
    ours = rope_cache(context, 6, 10000.0, scaling | {"original_max_position_embeddings": 16})
    torch.testing.assert_close(ours, torch.stack([cos[0], sin[0]]))


def test_hf_config_reads_phi3_forms():
    """Phi-3's own config.json forms: su (transformers' old name of longrope) with original_max_position_embeddings
    beside rope_scaling, a sliding window longer than the context (dropped), partial rotary."""
    c = {"vocab_size": 64, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1}
    c |= {"intermediate_size": 96, "max_position_embeddings": 128, "original_max_position_embeddings": 32}
    c |= {"partial_rotary_factor": 0.5, "sliding_window": 262144}
    c |= {"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    cfg = family("phi3").config_from_hf(c, "config.json")
    assert cfg["rope_dim"] == 8 and "sliding_window" not in cfg
    assert cfg["rope_scaling"] == {
        "type": "longrope",
        "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 32,
    }
    with pytest.raises(UserError, match="longrope rope scaling lacks original_max_position_embeddings"):
        family("phi3").config_from_hf({**c, "original_max_position_embeddings": None}, "config.json")
    with pytest.raises(UserError, match="rope type 'dynamic' is not supported"):
        family("phi3").config_from_hf({**c, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "config.json")


def test_partial_rotary_factor_survives_transformers_rounding():
    """rope_dim 30 of 44: 30 / 44 * 44 is just below 30 in floats; the factor written reads back as 30."""
    cfg = GPTConfig(style="phi3", vocab_size=64, d_model=88, n_head=2, rope_dim=30)
    factor = family("phi3").hf_config(cfg)["partial_rotary_factor"]
    assert int(44 * (30 / 44)) == 29 and int(44 * factor) == 30


def tiny(**kwargs) -> torch.nn.Module:
    return build_model({"arch": "gpt", "vocab_size": 320, "d_model": 64, "n_head": 4, **kwargs})


def test_gguf_refuses_what_llamacpp_would_compute_otherwise(tmp_path):
    tiny_tokenizer(tmp_path)
    tok = tmp_path / "tokenizer.json"
    with pytest.raises(UserError, match="llama.cpp's phi3 switches sliding-window attention off"):
        export_gguf(tiny(style="phi3", sliding_window=8), META, tok, tmp_path / "a.gguf", "f32")
    longrope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    longrope["original_max_position_embeddings"] = 32
    with pytest.raises(UserError, match="llama.cpp's llama reads no LongRoPE factors"):
        export_gguf(tiny(style="llama", rope_scaling=longrope), META, tok, tmp_path / "b.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf"))
