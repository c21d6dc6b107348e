from family_cases import FamilyCase
from family_cases.gemma3 import SHAPE, WIDE

# Gemma 3's case's shape; sliding and full layers alternating, both soft-caps low enough to bite on tiny random
# weights
BASE = SHAPE | {"num_hidden_layers": 4, "attn_logit_softcapping": 0.05, "final_logit_softcapping": 1.0}

CASES = {
    # llama.cpp's gemma2 computes the GELU from an fp16 table: see FamilyCase.adapter_exact
    "gemma2": FamilyCase("Gemma2ForCausalLM", "Gemma2Config", BASE, WIDE, adapter_exact=False),
    # transformers' caps are optional (null: none); llama.cpp's gemma2 always caps
    "gemma2_uncapped": FamilyCase(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        BASE | {"attn_logit_softcapping": None, "final_logit_softcapping": None},
        gguf_refuses="always soft-caps",
    ),
}
