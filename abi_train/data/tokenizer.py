"""Byte-level BPE tokenizer (GPT-2 style) on top of HF `tokenizers`.

Kept to exactly what llama.cpp's "gpt2" tokenizer with pre-tokenizer "gpt-2" reproduces: the GPT-2 split
regex, bytes mapped to printable unicode, BPE merges, and no normalizer or post-processor. All 256 byte
symbols are in the vocabulary, so any text encodes without an unknown token.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from abi_train.errors import UserError

EOS = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper that knows the special ids; ``.hf`` is the underlying ``tokenizers.Tokenizer``."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>") -> None:
        eos = hf.token_to_id(EOS)
        if eos is None:
            raise UserError(f"tokenizer {source} has no {EOS} token; abi_train needs it as the document separator")
        self.hf = hf
        self.eos_id: int = eos
        self.bos_id: int = eos  # GPT-2 convention: one token both starts and ends documents
        self.pad_id: int | None = None  # training never pads (fixed-length windows)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOS,)) -> Tokenizer:
        """Train byte-level BPE on ``texts``. The same texts and sizes give the same tokenizer."""
        if EOS not in special_tokens:
            special_tokens = (EOS, *special_tokens)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise UserError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                f"{len(alphabet) + len(special_tokens)} (256 bytes + special tokens)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise UserError(f"not a valid tokenizer.json: {path} ({str(e).splitlines()[0]})") from None
        return cls(hf, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temp file + rename), so a killed run leaves no half file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.hf.to_str(), encoding="utf-8")
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens so decode(encode(s)) == s even when s contains <|endoftext|>.
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: cache keys and shard metadata use it."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()
