from family_cases import FamilyCase
from family_cases.llama import BASE, WIDE

MISTRAL = BASE | {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}

CASES = {
    "mistral": FamilyCase("MistralForCausalLM", "MistralConfig", MISTRAL | {"sliding_window": None}, WIDE),
    # Mistral 7B v0.1's window (8 here, shorter than the test text): llama.cpp runs Mistral as llama, which
    # attends to the whole context, so our GGUF export refuses it
    "mistral-swa": FamilyCase(
        "MistralForCausalLM", "MistralConfig", MISTRAL | {"sliding_window": 8}, WIDE, gguf_refuses="sliding_window=8"
    ),
}
