"""Tokenizers on top of HF `tokenizers`: the byte-level BPE abi_train trains, and real ones it loads.

A trained tokenizer is kept to exactly what llama.cpp's "gpt2" tokenizer with pre-tokenizer "gpt-2"
reproduces: the GPT-2 split regex, bytes mapped to printable unicode, BPE merges, no normalizer or
post-processor, and ``<|endoftext|>`` as the one token that starts and ends documents.

A loaded tokenizer (``tokenizer.json`` with the ``tokenizer_config.json`` beside it, as Hugging Face
writes them) brings its own special tokens: BOS/EOS/PAD by name (Llama 3's ``<|end_of_text|>``, SmolLM's
``<|im_end|>``), whether prompts start with BOS (``add_bos_token``) and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from abi_train.errors import UserError

EOS = "<|endoftext|>"
CONFIG_NAME = "tokenizer_config.json"


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template of a Hugging Face folder: chat_template.jinja (transformers >= 4.47 writes it
    there), else tokenizer_config.json's ``chat_template`` (a string, or a list of named templates)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    """A thin wrapper that knows the special ids; ``.hf`` is the underlying ``tokenizers.Tokenizer``."""

    def __init__(
        self,
        hf: HFTokenizer,
        source: str = "<memory>",
        *,
        eos: str | None = None,
        bos: str | None = None,
        pad: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        gguf_pre: str | None = None,
    ) -> None:
        eos = eos or EOS
        eos_id = hf.token_to_id(eos)
        if eos_id is None:
            raise UserError(
                f"tokenizer {source} has no end-of-text token {eos!r}; name it as eos_token in {CONFIG_NAME}"
            )
        bos_id = hf.token_to_id(bos) if bos else eos_id  # GPT-2 convention: one token starts and ends documents
        if bos_id is None:
            raise UserError(f"tokenizer {source}: its bos_token {bos!r} is not in the vocabulary")
        pad_id = hf.token_to_id(pad) if pad else None
        self.hf = hf
        self.eos_id: int = eos_id
        self.bos_id: int = bos_id
        self.pad_id: int | None = pad_id  # training never pads (fixed-length windows)
        self.add_bos = add_bos  # prompts start with BOS (Llama, SmolLM2: no; Llama 3: yes)
        self.chat_template = chat_template
        self.gguf_pre = gguf_pre  # llama.cpp's tokenizer.ggml.pre, when the tokenizer came from a GGUF file

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
    def load(cls, path: str | Path, defaults: dict[str, Any] | None = None) -> Tokenizer:
        """``tokenizer.json`` (or a folder holding it), with the tokenizer_config.json and chat template
        beside it when present. ``defaults`` fills what that config leaves out (e.g. ``eos_token`` from a
        model's generation config)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise UserError(f"not a valid tokenizer.json: {path} ({str(e).splitlines()[0]})") from None
        config: dict[str, Any] = dict(defaults or {})
        config_path = path.with_name(CONFIG_NAME)
        if config_path.is_file():
            try:
                config |= {
                    k: v for k, v in json.loads(config_path.read_text(encoding="utf-8")).items() if v is not None
                }
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON: {config_path} ({e})") from None
        return cls(
            hf,
            source=str(path),
            eos=_token_name(config.get("eos_token")),
            bos=_token_name(config.get("bos_token")),
            pad=_token_name(config.get("pad_token")),
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=read_chat_template(path.parent, config),
            gguf_pre=config.get("gguf_pre"),
        )

    def config(self) -> dict[str, Any]:
        """tokenizer_config.json as transformers reads it (plus ``gguf_pre``, which it ignores)."""
        name = self.hf.id_to_token
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.pad_id is not None:
            config["pad_token"] = name(self.pad_id)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.gguf_pre:
            config["gguf_pre"] = self.gguf_pre
        return config

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json beside it, each atomically (temp file + rename),
        so a killed run leaves no half file."""
        path = Path(path)
        for target, text in (
            (path, self.hf.to_str()),
            (path.with_name(CONFIG_NAME), json.dumps(self.config(), indent=2)),
        ):
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model saw prompts in training: BOS first when the tokenizer asks for it."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos or not ids else ids

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
