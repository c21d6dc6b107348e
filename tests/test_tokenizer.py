"""Byte-level BPE tokenizer: training, round trips, determinism, file handling.

Golden ids (tests/golden/tokenizer_ids.json) pin what a tokenizer trained on the built-in corpus does to a
few strings, so a change in training (or in the `tokenizers` library) is noticed. Regenerate with
``ABI_REGEN_GOLDEN=1 pytest tests/test_tokenizer.py``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from abi_train.data.text import builtin_documents
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.errors import UserError

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_ids.json"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Pack my box with five dozen liquor jugs! It's 2024, isn't it?\n" * 20,
    "def f(x):\n    return x + 1  # comment\n" * 20,
]
HARD = [
    "",
    " leading space",
    "  two leading spaces and trailing  ",
    "héllo wörld, naïve café",
    "中文字符 日本語 한국어",
    "emoji 🤖👍🏽 and ZWJ 👩‍👩‍👧",
    "ctrl \x00\x01\x7f tab\t cr\r\n lf\n\n",
    f"two docs{EOS}joined",
    "x" * 3000,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


def test_train_sizes_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 300
    assert tok.eos_id == tok.bos_id == tok.hf.token_to_id(EOS)
    assert tok.pad_id is None
    assert tok.encode(EOS) == [tok.eos_id]
    # Merges were learned: frequent text takes fewer tokens than bytes.
    assert len(tok.encode(CORPUS[0])) < 0.75 * len(CORPUS[0])


def test_gpt2_split_and_nothing_llamacpp_would_not_reproduce(tok: Tokenizer) -> None:
    pieces = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("Hello world, it's 42!")]
    assert pieces == ["Hello", "Ġworld", ",", "Ġit", "'s", "Ġ42", "!"]
    spec = json.loads(tok.hf.to_str())
    assert spec["normalizer"] is None and spec["post_processor"] is None
    assert spec["model"]["type"] == "BPE"


@pytest.mark.parametrize("text", HARD)
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_random_unicode_round_trips(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        text = raw.decode("utf-8", errors="replace") + "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(8))
        text = text.encode("utf-8", errors="replace").decode("utf-8")  # drop lone surrogates
        assert tok.decode(tok.encode(text)) == text


def test_every_byte_is_a_token(tok: Tokenizer) -> None:
    for b in range(256):
        assert len(tok.hf.encode(bytes([b]).decode("latin-1")).ids) >= 1
    assert len({tuple(tok.encode(chr(c))) for c in range(0x20, 0x7F)}) == 0x7F - 0x20


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp file
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    for text in HARD:
        assert loaded.encode(text) == tok.encode(text)


def test_training_is_deterministic_across_processes(tok: Tokenizer, tmp_path: Path) -> None:
    assert Tokenizer.train(CORPUS, vocab_size=300).fingerprint == tok.fingerprint
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_tokenizer import CORPUS; "
        "from abi_train.data.tokenizer import Tokenizer; print(Tokenizer.train(CORPUS, 300).fingerprint)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == tok.fingerprint


def test_golden_ids_on_builtin_corpus() -> None:
    tok = Tokenizer.train(builtin_documents(), vocab_size=512)
    got = {text: tok.encode(text) for text in ["The quick brown fox.", "def main():\n    return 0\n", "héllo 🤖"]}
    if os.environ.get("ABI_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, ensure_ascii=False) + "\n", encoding="utf-8")
    assert got == json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_needs_endoftext_and_room_for_bytes(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(CORPUS, vocab_size=100)
    no_eos = Tokenizer.train(CORPUS, vocab_size=300)
    spec = json.loads(no_eos.hf.to_str())
    spec["added_tokens"] = []
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k != EOS}
    path = tmp_path / "no_eos.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="has no end-of-text token '<\\|endoftext\\|>'; name it as eos_token"):
        Tokenizer.load(path)
