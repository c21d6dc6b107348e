"""Token arrays as training windows, and on-disk token shards for corpora too big to hold in memory.

Shard folder layout (written by scripts/make_token_shards.py):
    DIR/train_000.bin, train_001.bin, ..., val_000.bin   raw little-endian uint16 (or uint32) token ids
    DIR/meta.json                                         dtype, token counts, tokenizer sha256
    DIR/tokenizer.json                                    the tokenizer that produced the ids
Shards are read with np.memmap: nothing is loaded until a window is indexed.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from abi_train.data import TokenData
from abi_train.data.text import token_dtype
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

SHARD_FORMAT = "abi_train-token-shards-v1"


class TokenWindows(Dataset):
    """Item i = ``seq_len + 1`` consecutive tokens starting at ``i * seq_len`` (non-overlapping inputs;
    the extra token is the last target). Several arrays (shards) are windowed separately, end to end."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int) -> None:
        self.arrays = list(arrays)
        self.seq_len = seq_len
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.starts = np.cumsum([0, *counts]).tolist()  # first window index of each array

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a = bisect.bisect_right(self.starts, i) - 1
        start = (i - self.starts[a]) * self.seq_len
        return torch.from_numpy(self.arrays[a][start : start + self.seq_len + 1].astype(np.int64))


def collate_windows(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows into next-token pairs: x = tokens[:, :-1], y = tokens[:, 1:] (both int64, B x T)."""
    w = torch.stack(windows)
    return w[:, :-1], w[:, 1:]


# --- shards --------------------------------------------------------------------------------------
class ShardWriter:
    """Append token arrays per split; full shards of ``shard_tokens`` are flushed as they fill.

    Everything is written into a temp folder beside ``out`` and renamed by ``close()``, so a killed
    run leaves no half-written shard folder.
    """

    def __init__(self, out: str | Path, tokenizer: Tokenizer, shard_tokens: int) -> None:
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"output folder {self.out} exists and is not empty")
        if shard_tokens < 2:
            raise UserError(f"shard size must be at least 2 tokens, got {shard_tokens}")
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.shards: dict[str, list[dict]] = {"train": [], "val": []}

    def add(self, split: str, tokens: np.ndarray) -> None:
        self.buffers[split].append(tokens)
        if sum(map(len, self.buffers[split])) >= self.shard_tokens:
            flat = np.concatenate(self.buffers[split])
            while len(flat) >= self.shard_tokens:
                self._write(split, flat[: self.shard_tokens])
                flat = flat[self.shard_tokens :]
            self.buffers[split] = [flat]

    def _write(self, split: str, tokens: np.ndarray) -> None:
        name = f"{split}_{len(self.shards[split]):03d}.bin"
        tokens.astype(self.dtype).tofile(self.tmp / name)
        self.shards[split].append({"file": name, "tokens": len(tokens)})

    def close(self) -> dict:
        """Flush the partial shards, write meta.json + tokenizer.json, move the folder into place."""
        for split, parts in self.buffers.items():
            if parts and sum(map(len, parts)):
                self._write(split, np.concatenate(parts))
        meta = {
            "format": SHARD_FORMAT,
            "dtype": self.dtype.name,
            "byte_order": "little",
            "vocab_size": self.tokenizer.vocab_size,
            "eos_id": self.tokenizer.eos_id,
            "tokenizer_sha256": self.tokenizer.fingerprint,
            "train_tokens": sum(s["tokens"] for s in self.shards["train"]),
            "val_tokens": sum(s["tokens"] for s in self.shards["val"]),
            "shards": self.shards,
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        self.tokenizer.save(self.tmp / "tokenizer.json")
        if self.out.exists():
            self.out.rmdir()  # checked empty in __init__
        os.rename(self.tmp, self.out)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class ShardData:
    train: list[np.ndarray]  # read-only memmaps, one per shard
    val: list[np.ndarray]
    tokenizer: Tokenizer
    meta: dict


def load_shards(path: str | Path, tokenizer: Tokenizer | None = None) -> ShardData:
    """Open a shard folder memory-mapped. The tokenizer defaults to the folder's copy and must be the
    one the shards were written with (checked by hash)."""
    root = Path(path)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"data.path {root} is not a token shard folder (no meta.json); see scripts/make_token_shards.py"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != SHARD_FORMAT:
        raise UserError(f"{meta_path}: unknown shard format {meta.get('format')!r}; expected {SHARD_FORMAT}")
    tokenizer = tokenizer or Tokenizer.load(root / "tokenizer.json")
    if tokenizer.fingerprint != meta["tokenizer_sha256"]:
        raise UserError(f"the run's tokenizer is not the one the shards in {root} were written with")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")

    def open_split(split: str) -> list[np.ndarray]:
        arrays = []
        for shard in meta["shards"][split]:
            f = root / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"token shard {f} is missing or truncated (expected {shard['tokens']} tokens)")
            arrays.append(np.memmap(f, dtype=dtype, mode="r"))
        return arrays

    return ShardData(open_split("train"), open_split("val"), tokenizer, meta)


def open_shards(d: DictConfig, tokenizer: Tokenizer | None) -> TokenData:
    """The ``data=shards`` opener (abi_train.data.SOURCES): the shard folder's memmaps, one per shard."""
    if not d.get("path"):
        raise UserError("data=shards needs data.path=DIR (a folder from scripts/make_token_shards.py)")
    shards = load_shards(d.path, tokenizer)
    return TokenData(shards.train, shards.val, shards.tokenizer)
