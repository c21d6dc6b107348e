"""GGUF export of SentencePiece-style tokenizers (a BPE with byte fallback, spaces as U+2581: the tokenizer.json of
Llama 2, Mistral, Phi-3 and Gemma) as llama.cpp's "llama" vocabulary.

Tiny tokenizers are built here the way those files are: the Llama 2 form (Prepend + Replace normalizer, <unk> <s>
</s>) and Gemma's (Replace normalizer, no space before the text, <pad> <eos> <bos> <unk> and turn tokens, user-defined
pieces spelled with U+2581), the 256 <0xXX> byte tokens, and merges either as HF's BPE trainer learned them or as
transformers converts a SentencePiece model (every two-part split of every token, ranked by token id). Each is
exported with a tiny llama model; then llama.cpp (vocab only) tokenizes ~1400 texts (ASCII, space runs, newlines,
accents, CJK and emoji through byte fallback, special tokens in the text, Python docs) to HF's ids, with BOS as
HF's post-processor adds it, and detokenizes to HF's text; our own import of the file gives HF's ids too. Metaspace
(transformers' legacy=False) exports with its one known difference logged; Unigram and what llama.cpp cannot
reproduce are refused.
"""

from __future__ import annotations

import ctypes
import json
import logging
import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from conftest import TRICKY_TEXTS
from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from abi_train.errors import UserError
from abi_train.export import export_gguf
from abi_train.gguf_reader import load_gguf
from abi_train.models import build_model

SPACE = "\u2581"
DOCS = list(pydoc_data.topics.topics.values())
BYTES = [f"<0x{b:02X}>" for b in range(256)]
SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                         "<end_of_turn>"]}  # fmt: skip
BOS_EOS = {"llama": ("<s>", "</s>"), "gemma": ("<bos>", "<eos>")}
# case -> (style, merges, user-defined pieces)
CASES = {
    "llama-trained": ("llama", "trained", ()),
    "llama-converted": ("llama", "converted", ()),
    "gemma-trained": ("gemma", "trained", ()),
    "gemma-converted": ("gemma", "converted", (SPACE * 2, SPACE * 4)),
}
TEXTS = [
    *TRICKY_TEXTS,
    "",
    " x",
    "x ",
    "  two leading, two  inner   and three",
    "\n\nnew\nlines\n",
    "a\u2581b",
    "Ünïcödé, 日本語のテキスト, 😀👍🏽 and \u200b",
    *(seg for doc in DOCS[40:140] for seg in doc.split("\n\n")),  # held out from training
]
SPECIAL_TEXTS = {
    "llama": ["<s>one</s>two <s> three", "</s>", "a<unk>b"],
    "gemma": ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos><eos>x", " <pad> "],
}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE pieces and merges learned from 40 Python docs with spaces as U+2581, split before each U+2581 (as
    SentencePiece splits on whitespace)."""
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    hf.pre_tokenizer = pre_tokenizers.Split(SPACE, "merged_with_next")
    hf.train_from_iterator(DOCS[:40], trainers.BpeTrainer(vocab_size=1200, show_progress=False))
    model = json.loads(hf.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def spm_tokenizer(style: str, merges: str, user_defined: tuple[str, ...], trained) -> HFTokenizer:
    """A tokenizer.json as Llama 2's ("llama") or Gemma's ("gemma") is made, over the trained pieces."""
    pieces, learned = trained
    vocab: dict[str, int] = {}
    for t in [*SPECIALS[style], *user_defined, *BYTES, *sorted(pieces, key=pieces.get)]:
        vocab.setdefault(t, len(vocab))
    if merges == "converted":  # transformers' SentencePiece converter: every split, in token id order
        learned = [(t[:k], t[k:]) for t in vocab for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    hf = HFTokenizer(models.BPE(vocab, learned, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        hf.normalizer = normalizers.Replace(" ", SPACE)
        hf.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as Gemma's files have it
    hf.decoder = decoders.Sequence(steps)
    bos = BOS_EOS[style][0]
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[style]])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return hf


def export(hf: HFTokenizer, style: str, out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json in ``out`` and a tiny llama model with them as ``out/m.gguf``; its
    embedding rows round up to 64, so the vocabulary is padded."""
    out.mkdir()
    hf.save(str(out / "tokenizer.json"))
    bos, eos = BOS_EOS[style]
    config = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "add_bos_token": True}
    if style == "gemma":
        config["pad_token"] = "<pad>"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    rows = -(-hf.get_vocab_size() // 64) * 64
    torch.manual_seed(0)
    model = build_model(dict(arch="gpt", style="llama", vocab_size=rows, context_length=64, n_layer=1, n_head=2,
                             d_model=32))  # fmt: skip
    return export_gguf(model.eval(), {"family": "llm", "step": 1}, out / "tokenizer.json", out / "m.gguf", "f32")


@pytest.fixture(scope="module", params=CASES)
def case(request, trained, tmp_path_factory) -> tuple[str, tuple[str, ...], HFTokenizer, Path]:
    """(style, user-defined pieces, the HF tokenizer, its exported GGUF file)."""
    style, merges, user_defined = CASES[request.param]
    hf = spm_tokenizer(style, merges, user_defined, trained)
    return style, user_defined, hf, export(hf, style, tmp_path_factory.mktemp(request.param) / "tok")


def hf_ids(hf: HFTokenizer, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


def llamacpp_text(llama_cpp, llm, ids: list[int]) -> str:
    """llama.cpp's own detokenization, special tokens rendered (llama-cpp-python's ``detokenize`` joins pieces of
    at most 32 bytes and keeps the space put before the text)."""
    buf = ctypes.create_string_buffer(256 * len(ids) + 1)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_detokenize(
        vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids), buf, len(buf), False, True
    )
    assert n >= 0
    return buf.raw[:n].decode()


def test_metadata(case):
    style, user_defined, hf, path = case
    kv = {k: f.contents() for k, f in GGUFReader(path).fields.items()}
    tokens, types, scores = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.scores"]
    n, vocab = hf.get_vocab_size(), hf.get_vocab()
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_space_prefix"] is (style == "llama")
    assert len(tokens) == len(types) == len(scores) == kv["llama.vocab_size"] == -(-n // 64) * 64 > n
    # user-defined pieces are spelled with spaces (llama.cpp matches them in the raw text), the rest as in HF
    spelled = {t.replace(SPACE, " "): t for t in user_defined}
    assert [spelled.get(t, t) for t in tokens[:n]] == [hf.id_to_token(i) for i in range(n)]
    assert [types[vocab[t]] for t in user_defined] == [TokenType.USER_DEFINED] * len(user_defined)
    assert [types[vocab[b]] for b in BYTES] == [TokenType.BYTE] * 256
    assert types[vocab["<unk>"]] == TokenType.UNKNOWN and kv["tokenizer.ggml.unknown_token_id"] == vocab["<unk>"]
    assert {types[vocab[t]] for t in SPECIALS[style] if t != "<unk>"} == {TokenType.CONTROL}
    assert types.count(TokenType.NORMAL) == n - 256 - len(SPECIALS[style]) - len(user_defined)
    assert set(types[n:]) == {TokenType.UNUSED} and all(t.startswith("[PAD") for t in tokens[n:])
    bos, eos = BOS_EOS[style]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (vocab[bos], vocab[eos])
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    # the first merge's token scores highest; bytes, special tokens and padding never outrank a merge
    first = json.loads(hf.to_str())["model"]["merges"][0]
    assert scores[vocab["".join(first)]] == 0 and scores[vocab[bos]] == scores[vocab["<0x41>"]] == min(scores)


def test_import_tokenizes_like_hf(case):
    style, _, hf, path = case
    ours = load_gguf(path).tokenizer
    for text in TEXTS + SPECIAL_TEXTS[style]:
        assert ours.encode(text) == hf_ids(hf, text), text[:80]
        assert ours.decode(ours.encode(text)) == hf.decode(hf_ids(hf, text), skip_special_tokens=False), text[:80]
    assert ours.encode_prompt("Hello") == hf.encode("Hello").ids  # BOS first, as HF's post-processor adds it


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_hf(case, llama_cpp):
    style, _, hf, path = case
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS + SPECIAL_TEXTS[style]:
            ids = hf_ids(hf, text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text[:80]
            assert llamacpp_text(llama_cpp, llm, ids) == hf.decode(ids, skip_special_tokens=False), text[:80]
        assert llm.tokenize(b"Hello", add_bos=True, special=False) == hf.encode("Hello").ids
    finally:
        llm.close()


@pytest.mark.llamacpp
def test_metaspace_exports_with_its_difference_logged(trained, tmp_path, caplog, llama_cpp):
    """transformers' Llama / Mistral tokenizer with legacy=False: a Metaspace pre-tokenizer (prepend_scheme "first")
    instead of the normalizer. llama.cpp, like SentencePiece, also puts a U+2581 before text that starts with a
    space and after a special token; everywhere else it tokenizes as HF."""
    hf = spm_tokenizer("llama", "trained", (), trained)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, "first", split=False)
    with caplog.at_level(logging.WARNING, logger="abi_train.export.gguf_common"):
        path = export(hf, "llama", tmp_path / "tok")
    assert "Metaspace" in caplog.text and "after a special token" in caplog.text
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in (t for t in TEXTS if not t.startswith(" ")):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids(hf, text), text[:80]
        for text in (" x", "a</s>b"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) != hf_ids(hf, text), text
    finally:
        llm.close()


def test_whitespace_stripping_added_tokens_are_named(trained, tmp_path, caplog):
    """GGUF cannot carry an added token's lstrip / rstrip (Phi-3's turn tokens have rstrip)."""
    hf = spm_tokenizer("llama", "trained", (), trained)
    hf.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False, rstrip=True)])
    with caplog.at_level(logging.WARNING, logger="abi_train.export.gguf_common"):
        export(hf, "llama", tmp_path / "tok")
    assert "strips around <|end|>" in caplog.text


def test_refusals(trained, tmp_path):
    """What llama.cpp's SentencePiece tokenizer cannot reproduce: one line each, and no file."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("a", -1.0)]
    unigram = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    nfkc = spm_tokenizer("llama", "trained", (), trained)
    nfkc.normalizer = normalizers.Sequence([normalizers.NFKC(), nfkc.normalizer])
    split = spm_tokenizer("llama", "trained", (), trained)
    split.normalizer = None
    split.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, "always", split=True)
    no_bytes = HFTokenizer(models.BPE({"<unk>": 0, "<s>": 1, "</s>": 2, SPACE: 3}, [], unk_token="<unk>",
                                      byte_fallback=True))  # fmt: skip
    no_bytes.normalizer = normalizers.Replace(" ", SPACE)
    cases = [
        (unigram, "Unigram"),
        (nfkc, "normalizer / pre-tokenizer does more than"),
        (split, "normalizer / pre-tokenizer does more than"),
        (no_bytes, "byte fallback needs all 256 <0xXX> tokens"),
    ]
    for i, (hf, msg) in enumerate(cases):
        with pytest.raises(UserError, match=msg) as e:
            export(hf, "llama", tmp_path / str(i))
        assert len(str(e.value).splitlines()) == 1
        assert not (tmp_path / str(i) / "m.gguf").exists()
