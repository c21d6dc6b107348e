from family_cases import FamilyCase

BASE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}
BASE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
BASE |= {"bos_token_id": 0, "eos_token_id": 1}
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}

CASES = {
    "llama": FamilyCase("LlamaForCausalLM", "LlamaConfig", BASE | {"tie_word_embeddings": False}, WIDE),
}
