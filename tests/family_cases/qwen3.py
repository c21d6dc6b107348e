from family_cases import FamilyCase
from family_cases.llama import BASE

ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
# head_dim 32 on d_model 64 (4 heads): the head size apart from the width, as Qwen3's 128 on 1024
QWEN3 = BASE | ROPE | {"head_dim": 32, "tie_word_embeddings": True}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
WIDE |= {"head_dim": 64}  # attn_output's input: 4 heads x 64 = 256

CASES = {
    "qwen3": FamilyCase("Qwen3ForCausalLM", "Qwen3Config", QWEN3, WIDE),
    # q/k/v/o biases (no released Qwen3 has them): llama.cpp's qwen3 fails to load a file with them
    "qwen3-bias": FamilyCase(
        "Qwen3ForCausalLM", "Qwen3Config", QWEN3 | {"attention_bias": True}, gguf_refuses="attention_bias=true"
    ),
}
