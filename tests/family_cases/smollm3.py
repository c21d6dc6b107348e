from family_cases import FamilyCase
from family_cases.llama import BASE, WIDE

# Four layers: the last has no RoPE (no_rope_layer_interval 4 -> no_rope_layers [1, 1, 1, 0]), as llama.cpp's
# smollm3 skips it on every 4th layer.
SMOLLM3 = BASE | {
    "num_hidden_layers": 4,
    "pad_token_id": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6},
}

CASES = {
    "smollm3": FamilyCase("SmolLM3ForCausalLM", "SmolLM3Config", SMOLLM3, WIDE),
    # NoPE on layers 1 and 3: llama.cpp hard-codes every 4th, so our GGUF export refuses it
    "smollm3-nope2": FamilyCase(
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        SMOLLM3 | {"no_rope_layer_interval": 2},
        gguf_refuses=r"nope_layers=\[1, 3\]",
    ),
}
