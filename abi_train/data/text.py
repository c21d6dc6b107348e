"""Text corpora -> one flat token array per split, tokenized once and cached.

Sources: the built-in offline corpus (the standard library's pydoc_data: ~460 KB of English docs) or
local .txt/.json/.jsonl/.parquet/.csv files read through HF `datasets`. Documents are joined with
<|endoftext|> (appended after each one). The validation split is the last ``val_fraction`` of the text,
measured in characters and cut inside a document if needed, so even a single file can be split.
A tokenizer trained here sees only the training part.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from abi_train.data import TokenData
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

# file suffix -> HF `datasets` packaged builder
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CACHE_VERSION = 1  # bump when the cached layout or the tokenization rules change


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "abi_train"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# --- reading documents ---------------------------------------------------------------------------
def builtin_documents() -> list[str]:
    """The offline default corpus: pydoc_data topics in sorted-key order (same on every machine)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def resolve_files(files: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand a path, glob or list of them into existing, non-empty files of one supported format."""
    patterns = [files] if isinstance(files, (str, Path)) else list(files)
    if not patterns:
        raise UserError("data.files is an empty list; give a path, a glob or a list of them (or null)")
    paths: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"data.files: no file matches {pattern!r}")
            paths += [Path(m) for m in matches]
        elif not Path(pattern).is_file():
            raise UserError(f"data.files: file not found: {pattern}")
        else:
            paths.append(Path(pattern))
    for p in paths:
        if p.suffix.lower() not in BUILDERS:
            raise UserError(f"data.files: unsupported file type {p}; accepted: {', '.join(BUILDERS)}")
        if p.stat().st_size == 0:
            raise UserError(f"data.files: empty file {p}")
    if len({BUILDERS[p.suffix.lower()] for p in paths}) > 1:
        raise UserError("data.files mixes formats (e.g. .txt and .csv); use files of one format per run")
    return paths


class FileDocuments:
    """Re-iterable non-empty texts of ``text_field`` in ``paths`` (a .txt file is one document)."""

    def __init__(self, paths: list[Path], text_field: str, hf_cache_dir: Path) -> None:
        import datasets

        datasets.disable_progress_bars()
        builder = BUILDERS[paths[0].suffix.lower()]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors become our one line
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=[str(p) for p in paths],
                split="train",
                cache_dir=str(hf_cache_dir),
                **kwargs,
            )
        except Exception as e:  # malformed JSON/CSV/parquet surfaces as assorted arrow/pandas/datasets errors
            where = paths[0] if len(paths) == 1 else f"one of {len(paths)} files ({paths[0]}, ...)"
            reason = str(e.__cause__ or e).splitlines()[0]
            raise UserError(f"data.files: could not read {where}: {reason}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
        if builder == "text":
            text_field = "text"  # plain text has no fields; the whole file is the text
        if text_field not in ds.column_names:
            raise UserError(
                f"data.text_field {text_field!r} is not a column of {paths[0]}; available: {', '.join(ds.column_names)}"
            )
        dtype = getattr(ds.features[text_field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise UserError(f"data.text_field {text_field!r} holds {dtype or ds.features[text_field]}, not text")
        self.ds = ds.select_columns([text_field])
        self.field = text_field

    def __iter__(self) -> Iterator[str]:
        for batch in self.ds.iter(batch_size=1000):
            yield from (t for t in batch[self.field] if t)


def split_documents(docs: Iterable[str], total_chars: int, val_fraction: float) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, is_val)`` pieces: the last ``val_fraction`` of all characters is validation."""
    cut = round(total_chars * (1.0 - val_fraction))
    seen = 0
    for doc in docs:
        start, seen = seen, seen + len(doc)
        if seen <= cut:
            yield doc, False
        elif start >= cut:
            yield doc, True
        else:  # the document that straddles the cut is split in two
            yield doc[: cut - start], False
            yield doc[cut - start :], True


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str], batch_docs: int = 512) -> Iterator[np.ndarray]:
    """Token arrays for ``docs`` (each followed by <|endoftext|>), one array per batch of documents."""
    dtype = token_dtype(tokenizer.vocab_size)
    batch: list[str] = []

    def flush() -> np.ndarray:
        ids = [i for enc in tokenizer.encode_batch(batch) for i in (*enc, tokenizer.eos_id)]
        batch.clear()
        return np.asarray(ids, dtype=dtype)

    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            yield flush()
    if batch:
        yield flush()


# --- cached tokenization -------------------------------------------------------------------------
@dataclass
class TextData:
    train: np.ndarray  # flat token ids (memory-mapped from the cache)
    val: np.ndarray
    tokenizer: Tokenizer
    cache_path: Path
    cache_hit: bool


def load_text_data(
    files: str | Path | Sequence[str | Path] | None,
    text_field: str,
    val_fraction: float,
    tokenizer: Tokenizer | None,
    vocab_size: int,
    cache_dir: str | Path | None,
) -> TextData:
    """Tokenize the corpus once (training a tokenizer if none is given) and cache the token arrays.

    The cache entry is keyed by the source (file paths + sizes + mtimes, or the built-in text), the
    text field, the split and the tokenizer (its hash, or the vocab size to train), and is written to a
    temp folder then renamed, so concurrent ranks or a killed run never leave a half entry.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if files is None:
        builtin = builtin_documents()
        source: object = hashlib.sha256("\0".join(builtin).encode()).hexdigest()
    else:
        paths = resolve_files(files)
        source = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key_src = {
        "version": CACHE_VERSION,
        "source": source,
        "text_field": text_field if files is not None else None,
        "val_fraction": val_fraction,
        "tokenizer": tokenizer.fingerprint if tokenizer else {"train_vocab_size": vocab_size},
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    entry = root / f"text-{key}"
    hit = (entry / "val.npy").is_file()
    if not hit:  # only now read the files (a hit never imports `datasets`)
        docs = builtin if files is None else FileDocuments(paths, text_field, root / "hf_datasets")
        _build_entry(entry, docs, val_fraction, tokenizer, vocab_size)
    return TextData(
        train=np.load(entry / "train.npy", mmap_mode="r"),
        val=np.load(entry / "val.npy", mmap_mode="r"),
        tokenizer=Tokenizer.load(entry / "tokenizer.json"),
        cache_path=entry,
        cache_hit=hit,
    )


def open_text(d: DictConfig, tokenizer: Tokenizer | None) -> TokenData:
    """The ``data=text`` opener (abi_train.data.SOURCES): the cached corpus as one array per split."""
    files = OmegaConf.to_container(d.files) if OmegaConf.is_config(d.files) else d.files
    text = load_text_data(files, d.text_field, float(d.val_fraction), tokenizer, int(d.vocab_size), d.get("cache_dir"))
    return TokenData([text.train], [text.val], text.tokenizer)


def _build_entry(
    entry: Path, docs: Iterable[str], val_fraction: float, tokenizer: Tokenizer | None, vocab_size: int
) -> None:
    texts = list(docs)
    if not any(texts):
        raise UserError("data.files holds no text (every document is empty)")
    pieces = list(split_documents(texts, sum(map(len, texts)), val_fraction))
    train_texts = [t for t, is_val in pieces if not is_val]
    val_texts = [t for t, is_val in pieces if is_val]
    if tokenizer is None:
        tokenizer = Tokenizer.train(train_texts, vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, part in (("train", train_texts), ("val", val_texts)):
            arrays = list(encode_documents(tokenizer, part))
            np.save(tmp / f"{name}.npy", np.concatenate(arrays) if arrays else np.zeros(0, dtype))
        tokenizer.save(tmp / "tokenizer.json")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first; theirs is identical
            if not (entry / "val.npy").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
