"""Text loading (files and the built-in corpus), the token cache, windows, and token shards."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from abi_train.data.text import builtin_documents, load_text_data, resolve_files, split_documents
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.data.tokens import TokenWindows, collate_windows, load_shards
from abi_train.errors import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_token_shards  # noqa: E402

DOCS = [f"Document {i}: " + "the cat sat on the mat and looked at the hat. " * (i + 1) for i in range(12)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS, vocab_size=300)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def expected_text(docs: list[str], val_fraction: float) -> tuple[str, str]:
    """What train/val decode to: every split piece followed by <|endoftext|>."""
    pieces = list(split_documents(docs, sum(map(len, docs)), val_fraction))
    return tuple("".join(t + EOS for t, v in pieces if v == is_val) for is_val in (False, True))


def load(files, tmp_path: Path, tok: Tokenizer | None, field: str = "text", vf: float = 0.25):
    return load_text_data(files, field, vf, tok, 300, tmp_path / "cache")


# --- splitting -----------------------------------------------------------------------------------
def test_split_is_the_last_fraction_of_characters() -> None:
    docs = ["aaaa", "bbbb", "cccc", "dddd"]
    assert list(split_documents(docs, 16, 0.25)) == [("aaaa", False), ("bbbb", False), ("cccc", False), ("dddd", True)]
    assert list(split_documents(["abcdefghij"], 10, 0.3)) == [("abcdefg", False), ("hij", True)]
    pieces = list(split_documents(docs, 16, 5 / 16))
    assert pieces == [("aaaa", False), ("bbbb", False), ("ccc", False), ("c", True), ("dddd", True)]


# --- file formats --------------------------------------------------------------------------------
def test_jsonl_tokens_decode_to_the_documents(tmp_path: Path, tok: Tokenizer) -> None:
    data = load(write_jsonl(tmp_path / "a.jsonl", DOCS), tmp_path, tok)
    train_text, val_text = expected_text(DOCS, 0.25)
    assert tok.decode(data.train.tolist()) == train_text
    assert tok.decode(data.val.tolist()) == val_text
    assert data.train.dtype == np.uint16
    assert 0.15 < len(data.val) / (len(data.train) + len(data.val)) < 0.35


def test_txt_file_is_one_document(tmp_path: Path, tok: Tokenizer) -> None:
    text = "line one\nline two\n\nparagraph two\n" * 30
    (tmp_path / "a.txt").write_text(text)
    data = load(str(tmp_path / "*.txt"), tmp_path, tok)  # a glob
    assert tok.decode(data.train.tolist()) + tok.decode(data.val.tolist()) == "".join(
        t + EOS for t, _ in split_documents([text], len(text), 0.25)
    )


def test_parquet_and_csv_with_a_named_field(tmp_path: Path, tok: Tokenizer) -> None:
    pq.write_table(pa.table({"body": DOCS[:6], "n": list(range(6))}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": DOCS[6:], "n": list(range(6))}), tmp_path / "b.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows([["n", "body"], *[[i, d] for i, d in enumerate(DOCS)]])
    from_parquet = load([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path, tok, field="body")
    from_csv = load(tmp_path / "a.csv", tmp_path, tok, field="body")
    assert tok.decode(from_parquet.train.tolist()) == expected_text(DOCS, 0.25)[0]
    np.testing.assert_array_equal(from_parquet.train, from_csv.train)
    np.testing.assert_array_equal(from_parquet.val, from_csv.val)


def test_builtin_corpus_trains_a_tokenizer(tmp_path: Path) -> None:
    data = load_text_data(None, "text", 0.05, None, 512, tmp_path)
    assert data.tokenizer.vocab_size == 512
    assert len(data.train) > 100_000 and len(data.val) > 5_000
    # The tokenizer saw only the training part; the eos separators are there.
    assert int((data.train == data.tokenizer.eos_id).sum()) >= len(builtin_documents()) * 0.9


# --- cache ---------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    first = load(path, tmp_path, None)
    second = load(path, tmp_path, None)
    assert not first.cache_hit and second.cache_hit and second.cache_path == first.cache_path
    np.testing.assert_array_equal(first.train, second.train)
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # no temp folders left
    # The trained tokenizer, passed back in (as on resume), hits a different but equal entry.
    again = load(path, tmp_path, first.tokenizer)
    np.testing.assert_array_equal(again.val, first.val)
    write_jsonl(path, DOCS[::-1])  # new content (size/mtime) -> new entry
    os.utime(path, ns=(1, 1))
    changed = load(path, tmp_path, None)
    assert not changed.cache_hit and changed.cache_path != first.cache_path


# --- bad input -----------------------------------------------------------------------------------
def test_missing_field_names_the_field_and_the_columns(tmp_path: Path, tok: Tokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", DOCS, field="content")
    with pytest.raises(UserError, match=r"'text' is not a column .* available: content, id"):
        load(path, tmp_path, tok)
    with pytest.raises(UserError, match="'id' holds int64, not text"):
        load(path, tmp_path, tok, field="id")


@pytest.mark.parametrize(
    "files, message",
    [
        ("missing.jsonl", "file not found"),
        ("*.nothing", "no file matches"),
        ("empty.jsonl", "empty file"),
        ("a.xml", "unsupported file type"),
        (["a.jsonl", "a.csv"], "mixes formats"),
        ([], "empty list"),
        ("broken.jsonl", "could not read"),
        ("blank.jsonl", "holds no text"),
    ],
)
def test_bad_files(tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch, files, message: str) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a.xml").write_text("<x/>")
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "a.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": unterminated\n')
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        load(files, tmp_path, tok)
    with pytest.raises(UserError, match="val_fraction"):
        load("a.jsonl", tmp_path, tok, vf=0.0)


def test_resolve_files_sorts_globs(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.jsonl"):
        write_jsonl(tmp_path / name, DOCS[:1])
    assert [p.name for p in resolve_files(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl", "c.jsonl"]


# --- windows -------------------------------------------------------------------------------------
def test_windows_are_non_overlapping_next_token_pairs() -> None:
    tokens = np.arange(23, dtype=np.uint16)
    ds = TokenWindows([tokens], seq_len=5)
    assert len(ds) == 4  # (23 - 1) // 5
    assert ds[1].tolist() == [5, 6, 7, 8, 9, 10]
    x, y = collate_windows([ds[0], ds[3]])
    assert x.dtype == y.dtype == torch.int64 and x.shape == (2, 5)
    assert x[1].tolist() == [15, 16, 17, 18, 19] and y[1].tolist() == [16, 17, 18, 19, 20]
    # Several arrays (shards) are windowed one after the other; none spans two arrays.
    two = TokenWindows([np.arange(11), np.arange(100, 107)], seq_len=5)
    assert len(two) == 3 and two[2].tolist() == list(range(100, 106))
    with pytest.raises(IndexError):
        two[3]


# --- shards --------------------------------------------------------------------------------------
def test_shards_equal_in_memory_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    files = [write_jsonl(tmp_path / "a.jsonl", DOCS[:5]), write_jsonl(tmp_path / "b.jsonl", DOCS[5:])]
    tok_path = tmp_path / "tok.json"
    tok.save(tok_path)
    out = tmp_path / "shards"
    make_token_shards.main(
        ["--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tok_path), "--out", str(out)]
        + ["--shard-tokens", "200", "--val-fraction", "0.25", "--cache-dir", str(tmp_path / "cache")]
    )
    shards = load_shards(out)
    assert isinstance(shards.train[0], np.memmap) and len(shards.train) > 2
    assert all(len(a) == 200 for a in shards.train[:-1])
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == [
        "meta.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    memory = load(files, tmp_path, tok)
    np.testing.assert_array_equal(np.concatenate(shards.train), memory.train)
    np.testing.assert_array_equal(np.concatenate(shards.val), memory.val)
    assert shards.meta["train_tokens"] == len(memory.train) and shards.meta["dtype"] == "uint16"
    assert shards.tokenizer.fingerprint == tok.fingerprint


def test_shard_errors(tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    tok.save(tmp_path / "tok.json")
    args = ["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "tok.json")]
    args += ["--cache-dir", str(tmp_path / "cache"), "--shard-tokens", "300"]
    make_token_shards.main([*args, "--out", str(tmp_path / "s")])
    with pytest.raises(UserError, match="not a token shard folder"):
        load_shards(tmp_path)
    other = Tokenizer.train(DOCS, vocab_size=290)
    other.save(tmp_path / "other.json")
    with pytest.raises(UserError, match="is not the one the shards"):
        load_shards(tmp_path / "s", other)
    shard = tmp_path / "s" / "train_001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        load_shards(tmp_path / "s")
    # The CLI: a non-empty output folder is refused in one line, exit code 2, nothing written.
    with pytest.raises(SystemExit) as exit_info:
        make_token_shards.main([*args, "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: output folder {tmp_path / 's'} exists and is not empty\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
