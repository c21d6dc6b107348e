"""llama.cpp (through llama-cpp-python, the gguf-check extra) runs our exported GGUF files.

For a briefly trained tiny LLaMA-style and GPT-2-style model: llama.cpp tokenizes like we do, its
logits match PyTorch's (relative error ||d||/||ref|| < 1e-3 for f32, < 1e-2 for f16, same argmax for
q8_0) and greedy generation of 32 tokens is identical for f32.
"""

from __future__ import annotations

import pydoc_data.topics

import numpy as np
import pytest
import torch
from conftest import TRICKY_TEXTS, llamacpp_logits

from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.export import export_gguf
from abi_train.models import build_model

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp


PROMPT = "The return statement leaves the current function call with the"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tokenizer + three tiny models (llama, gpt2, gpt2 without biases) trained for 30 AdamW steps on ~20 KB of
    Python docs."""
    docs = [d for _, d in sorted(pydoc_data.topics.topics.items())][:12]
    tok = Tokenizer.train(docs, 500)  # 500 tokens in 512 embedding rows: exercises GGUF vocab padding
    tmp = tmp_path_factory.mktemp("llamacpp")
    tok.save(tmp / "tokenizer.json")
    data = torch.tensor(tok.encode(EOS.join(docs)))
    models = {}
    for key, style, size, bias in [("llama", "llama", "tiny", None), ("gpt2", "gpt2", "gpt2-tiny", None),
                                   ("gpt2-nobias", "gpt2", "gpt2-tiny", False)]:  # fmt: skip
        torch.manual_seed(0)
        cfg = {"arch": "gpt", "name": size, "style": style, "vocab_size": 512, "context_length": 128, "n_layer": 2,
               "n_head": 4, "n_kv_head": 2 if style == "llama" else None, "d_model": 64, "bias": bias}  # fmt: skip
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(30):
            starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
            batch = torch.stack([data[s : s + 65] for s in starts])
            loss = model(batch[:, :-1], batch[:, 1:])
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert losses[-1] < losses[0] - 0.5  # it learned something
        model.eval()
        meta = {"family": "llm", "step": 30}
        files = {
            outtype: export_gguf(model, meta, tmp / "tokenizer.json", tmp / f"{key}-{outtype}.gguf", outtype)
            for outtype in ("f32", "f16", "q8_0")
        }
        models[key] = (model, files)
    return tok, models


def load(path):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, seed=0)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_tokenizer_ids_match(trained, style):
    tok, models = trained
    llm = load(models[style][1]["f32"])
    try:
        for s in (s for s in TRICKY_TEXTS if EOS not in s):  # special tokens: the line below
            assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s), s
            assert llm.detokenize(tok.encode(s)).decode() == s
        with_eos = f"one{EOS}two"
        assert llm.tokenize(with_eos.encode(), add_bos=False, special=True) == tok.encode(with_eos)
    finally:
        llm.close()


@pytest.mark.parametrize("style", ["llama", "gpt2", "gpt2-nobias"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_logits_match(trained, style, outtype):
    tok, models = trained
    model, files = models[style]
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    got = llamacpp_logits(files[outtype], ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    if outtype == "q8_0":
        assert got[-1].argmax() == ref[-1].argmax(), rel
    else:
        assert rel < {"f32": 1e-3, "f16": 1e-2}[outtype], rel


@pytest.mark.parametrize("style", ["llama", "gpt2", "gpt2-nobias"])
def test_greedy_generation_identical_f32(trained, style):
    tok, models = trained
    model, files = models[style]
    ids = tok.encode(PROMPT)
    ours = model.generate(torch.tensor([ids]), 32, temperature=0)[0, len(ids) :].tolist()
    llm = load(files["f32"])
    theirs = []
    try:
        llm.eval(ids)
        for _ in range(32):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(nxt)
            llm.eval([nxt])
    finally:
        llm.close()
    assert theirs == ours, (tok.decode(theirs), tok.decode(ours))
