from family_cases import FamilyCase

# head_dim apart from hidden / heads, a window of 8 (the test text is longer), every 3rd layer full, a global
# RoPE base apart from the local one, linearly scaled, a final soft-cap (optional in Gemma 3) that bites
SHAPE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32, "query_pre_attn_scalar": 32}
SHAPE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "sliding_window": 8}
SHAPE |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "query_pre_attn_scalar": 64}
BASE = SHAPE | {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}
BASE |= {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}}  # fmt: skip
BASE |= {"final_logit_softcapping": 1.0}
# llama.cpp's gemma3 computes the GELU from an fp16 table: see FamilyCase.adapter_exact
GEMMA = {"wide": WIDE, "adapter_exact": False}

CASES = {
    "gemma3": FamilyCase("Gemma3ForCausalLM", "Gemma3TextConfig", BASE | {"tie_word_embeddings": False}, **GEMMA),
    # the real models' tied head; a query scale apart from head_dim, which llama.cpp's gemma3 does not read
    "gemma3_query_scale": FamilyCase(
        "Gemma3ForCausalLM", "Gemma3TextConfig", BASE | {"query_pre_attn_scalar": 24}, gguf_refuses=r"1/sqrt\(32\)"
    ),
}
