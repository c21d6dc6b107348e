from family_cases import FamilyCase

# Phi3Config's default ids (32000) index past this vocabulary: no pad, BOS/EOS in it.
BASE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
BASE |= {"num_attention_heads": 4, "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1}
BASE |= {"pad_token_id": None}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}


def longrope(pairs: int) -> dict:
    """LongRoPE factors for ``pairs`` rotary frequency pairs, the long set far from the short one."""
    short = [1.0 + 0.05 * i for i in range(pairs)]
    long = [1.0 + 1.5 * i for i in range(pairs)]
    return {"type": "longrope", "short_factor": short, "long_factor": long}


# Phi-4-mini: GQA, tied embeddings, a quarter of each head unrotated, LongRoPE. original_max_position_embeddings
# (16) is below both the test text (transformers takes the long factors) and our context (so do we and llama.cpp);
# the attention factor is sqrt(1 + ln(128 / 16) / ln(16)).
PHI4 = BASE | {"num_key_value_heads": 2, "tie_word_embeddings": True, "partial_rotary_factor": 0.75}
PHI4 |= {"original_max_position_embeddings": 16, "rope_scaling": longrope(6)}  # head 16: 12 rotated, 6 pairs

CASES = {
    # Phi-3-mini-4k without its window: plain RoPE, MHA, untied.
    "phi3": FamilyCase("Phi3ForCausalLM", "Phi3Config", BASE | {"num_key_value_heads": 4}, WIDE),
    # Phi-3-mini-4k's sliding window (2047 there): transformers slides it on every layer; llama.cpp's phi3 switches
    # sliding-window attention off, so the GGUF export refuses this model and the llama.cpp checks cannot run.
    "phi3-window": FamilyCase(
        "Phi3ForCausalLM", "Phi3Config", BASE | {"num_key_value_heads": 4, "sliding_window": 8}, gguf=False
    ),
    "phi4-mini": FamilyCase(
        "Phi3ForCausalLM",
        "Phi3Config",
        PHI4,
        WIDE | {"num_key_value_heads": 2, "rope_scaling": longrope(24)},  # head 64: 48 rotated
    ),
}
