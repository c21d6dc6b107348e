"""GGUF pieces shared by every family: output types, per-tensor type choice, quantization, the
tokenizer (both directions) and provenance.

A byte-level BPE tokenizer is llama.cpp's "gpt2" kind; how it splits text before BPE is its
``tokenizer.ggml.pre``. ``PRE_TOKENIZERS`` is the one table of the pre names we support, each as the Hugging
Face pre-tokenizer that splits as llama.cpp does: import builds a file's entry, export writes the name a
tokenizer was imported with or the entry its tokenizer.json's pre-tokenizer equals.
A SentencePiece-style one (BPE with byte fallback, spaces as U+2581: Llama 2, Mistral, Phi-3, Gemma) is the
"llama" kind: export scores tokens by merge order and takes add_space_prefix from ``SPACE_RULES``; import turns
the scores back into merges. Unigram tokenizers are refused: llama.cpp's "llama" kind cannot segment like them.

A family module (``gguf_llm``; ``gguf_vit`` and ``gguf_clip`` follow the same shape) provides only its
name map and hyperparameters:

    NEEDS_TOKENIZER: bool
    ARCHITECTURES: tuple[str, ...]                      general.architecture values it writes/reads
    KEEP_F32: tuple[str, ...]                           name suffixes of 2-D+ tensors kept in F32
    KEEP_F16: tuple[str, ...]   (optional)              name suffixes stored F16 unless the outtype is f32
    architecture(model) -> str
    add_metadata(writer, model, meta, tokenizer_path)   "{arch}.*" keys (+ add_tokenizer here)
    to_gguf(model) -> dict[str, Tensor]                 GGUF name -> tensor (PyTorch layout)
    config_from_gguf(kv, tensors) -> dict               builder kwargs (with "arch") from a file; ``tensors``
                                                        maps names to tensors dequantized when read
    from_gguf(tensors, config) -> dict[str, Tensor]     our state dict from GGUF tensors
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from abi_train import __version__
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

log = logging.getLogger(__name__)

Q = GGMLQuantizationType
# outtype -> (general.file_type, the type of the 2-D weights)
OUTTYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
}


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r} is not supported; valid: {', '.join(OUTTYPES)}")
    return outtype


def tensor_type(
    name: str, shape: tuple[int, ...], outtype: str, keep_f32: tuple[str, ...] = (), keep_f16: tuple[str, ...] = ()
) -> Q:
    """1-D tensors (norms, biases) and ``keep_f32`` names stay F32; ``keep_f16`` names (conv kernels: ggml's
    im2col wants F16) are F16 unless the whole file is F32; quantized types need rows that are a whole
    number of blocks, otherwise the tensor falls back to F16."""
    qtype = OUTTYPES[outtype][1]
    if len(shape) < 2 or name.endswith(keep_f32):
        return Q.F32
    if name.endswith(keep_f16) and qtype != Q.F32:
        return Q.F16
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        log.warning(
            "%s: row length %d is not a multiple of %d, stored as F16 instead of %s", name, shape[-1], block, outtype
        )
        return Q.F16
    return qtype


def add_tensors(
    writer: GGUFWriter,
    tensors: dict[str, torch.Tensor],
    outtype: str,
    keep_f32: tuple[str, ...],
    keep_f16: tuple[str, ...] = (),
) -> None:
    for name, t in tensors.items():
        arr = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
        qtype = tensor_type(name, arr.shape, outtype, keep_f32, keep_f16)
        writer.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)


def add_general(writer: GGUFWriter, name: str, meta: dict[str, Any], outtype: str) -> None:
    """general.* keys plus where the weights came from (abi_train.*)."""
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_string("abi_train.version", str(meta.get("abi_train_version", __version__)))
    writer.add_string("abi_train.family", meta["family"])
    writer.add_string("abi_train.arch", meta["model_config"]["arch"])
    if meta.get("step") is not None:
        writer.add_uint64("abi_train.step", int(meta["step"]))


# llama.cpp's pre-tokenizers (llama-vocab.cpp: its tokenizer.ggml.pre names and the regexes each applies), as
# the Hugging Face pre-tokenizer that splits text the same way. One table serves both directions: import builds
# the entry of a file's pre name; export finds the entry whose serialized form equals the tokenizer.json's.
# Llama 3's split, as its tokenizer.json spells it (llama.cpp spells (?i:'s) as '[sS]: the same matches).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: the Hugging Face split that reproduces it and its vocab defaults."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    aliases: tuple[str, ...] = ()  # other tokenizer.ggml.pre names llama.cpp treats the same way
    ignore_merges: bool = False  # a whole split piece that is a token is used as is (llama.cpp's ignore_merges)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), _byte_level(False)]
    )


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # GPT-2's regex (ByteLevel's own).
    "gpt-2": PreTokenizer(lambda: _byte_level(True), aliases=("phi-2", "mpt", "olmo")),
    # Each digit alone (llama.cpp's "\p{N}" split; HF's Digits splits on char::is_numeric, the same set), then GPT-2.
    "smollm": PreTokenizer(
        lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]),
        aliases=("starcoder", "refact", "codeshell", "exaone", "minerva"),
    ),
    "llama-bpe": PreTokenizer(
        _split_then_bytes(LLAMA3_SPLIT),
        aliases=("llama3", "llama-v3", "falcon3", "pixtral", "midm-2.0"),
        ignore_merges=True,
        add_bos=True,
    ),
    "dbrx": PreTokenizer(_split_then_bytes(LLAMA3_SPLIT), aliases=("smaug-bpe",)),
    "qwen2": PreTokenizer(_split_then_bytes(QWEN2_SPLIT), aliases=("deepseek-r1-qwen", "stablelm2")),
}
_PRE_BY_NAME = {alias: name for name, entry in PRE_TOKENIZERS.items() for alias in (name, *entry.aliases)}


def pre_tokenizer_entry(pre: str) -> tuple[str, PreTokenizer]:
    """(canonical name, entry) of a tokenizer.ggml.pre value; an unknown one is a UserError naming the known."""
    if pre not in _PRE_BY_NAME:
        raise UserError(
            f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(sorted(_PRE_BY_NAME))}"
        )
    name = _PRE_BY_NAME[pre]
    return name, PRE_TOKENIZERS[name]


def _pre_json(pre: pre_tokenizers.PreTokenizer | dict[str, Any]) -> Any:
    """A pre-tokenizer as comparable JSON: serialized, with the keys that change only offsets dropped."""
    if not isinstance(pre, dict):
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = pre
        pre = json.loads(probe.to_str())["pre_tokenizer"]

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "trim_offsets"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return strip(pre)


def match_pre_tokenizer(spec: dict[str, Any], source: str) -> str:
    """The llama.cpp pre name whose split equals a tokenizer.json's pre_tokenizer (and merge rule)."""
    found = _pre_json(spec.get("pre_tokenizer") or {})
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    for name, entry in PRE_TOKENIZERS.items():
        if found == _pre_json(entry.build()) and ignore_merges == entry.ignore_merges:
            return name
    raise UserError(
        f"{source}: its pre-tokenizer matches none that llama.cpp implements ({', '.join(PRE_TOKENIZERS)}), "
        "so a GGUF file could not tokenize like it; export to --format hf instead"
    )


# How a SentencePiece-style tokenizer.json turns spaces into U+2581, as its normalizers and pre-tokenizers in order
# (a Sequence counts as its steps), and llama.cpp's add_space_prefix for it: llama.cpp puts a space before the
# text and after every special token, as HF's Prepend does (it runs on each segment between added tokens).
# HF's Metaspace adds none before a segment that starts with a space, and with prepend_scheme "first" none after
# a special token: the caveat logged. Gemma's Split on " " is a no-op, its Replace having left no space.
SPACE = "\u2581"
_REPLACE = normalizers.Replace(" ", SPACE)
SPACE_RULES: list[tuple[list[Any], list[Any], bool, str | None]] = [
    ([normalizers.Prepend(SPACE), _REPLACE], [], True, None),  # Llama 2, Mistral v0.1, Phi-3
    ([_REPLACE], [], False, None),  # Gemma
    ([_REPLACE], [pre_tokenizers.Split(" ", "merged_with_previous")], False, None),  # Gemma's own files
    ([], [pre_tokenizers.Metaspace(SPACE, "never", split=False)], False, None),
    ([], [pre_tokenizers.Metaspace(SPACE, "always", split=False)], True, "before text that starts with a space"),
    (
        [],
        [pre_tokenizers.Metaspace(SPACE, "first", split=False)],
        True,
        "before text that starts with a space nor after a special token",
    ),  # transformers' Llama / Mistral with legacy=False
]


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A serialized normalizer or pre-tokenizer as its list of steps (``key``: the list a Sequence holds)."""
    if not node:
        return []
    return [s for n in node[key] for s in _steps(n, key)] if node["type"] == "Sequence" else [node]


def _space_prefix(spec: dict[str, Any], source: str) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece-style tokenizer.json (as tokenizers serializes it)."""
    found = (_steps(spec.get("normalizer"), "normalizers"), _steps(spec.get("pre_tokenizer"), "pretokenizers"))
    probe = HFTokenizer(models.BPE())
    for norms, pres, prefix, caveat in SPACE_RULES:
        probe.normalizer = normalizers.Sequence(norms)
        probe.pre_tokenizer = pre_tokenizers.Sequence(pres)
        built = json.loads(probe.to_str())
        if found == (built["normalizer"]["normalizers"], built["pre_tokenizer"]["pretokenizers"]):
            if caveat:
                log.warning(
                    "%s: its Metaspace pre-tokenizer puts no %s %s; llama.cpp does (as SentencePiece does), so "
                    "such text tokenizes differently from the GGUF file",
                    source,
                    SPACE,
                    caveat,
                )
            return prefix
    raise UserError(
        f"{source}: its normalizer / pre-tokenizer does more than llama.cpp's SentencePiece tokenizer (spaces to "
        f"{SPACE}, optionally one before the text), so a GGUF file could not tokenize like it; "
        "export to --format hf instead"
    )


def _merge_pairs(model: dict[str, Any]) -> list[list[str]]:
    """A serialized BPE's merges as pairs (tokenizers < 0.20 writes each as "left right")."""
    return [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]


def _merge_scores(vocab: dict[str, int], merges: list[list[str]], n: int) -> list[float]:
    """tokenizer.ggml.scores of ``n`` rows for a BPE's merges. llama.cpp merges, of the adjacent pieces whose
    concatenation is a token, the pair whose token scores highest; BPE merges the pair of lowest rank. So the i-th
    token the merges make, in the order of its first merge, scores -i; the rest (characters, bytes, added tokens,
    padding) score below all of them."""
    order = dict.fromkeys(vocab[left + right] for left, right in merges)
    scores = [-float(len(order))] * n
    for rank, i in enumerate(order):
        scores[i] = -float(rank)
    return scores


def _vocab(tok: Tokenizer, spec: dict[str, Any], source: str, n_rows: int) -> tuple[list[str], list[TokenType]]:
    """The tokens by id with their types from added_tokens (special: CONTROL, else USER_DEFINED)."""
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError(f"{source}: token ids are not contiguous from 0; GGUF needs one token per id")
    if len(tokens) > n_rows:
        raise UserError(f"{source}: tokenizer has {len(tokens)} tokens but the model embeds only {n_rows}")
    types = [TokenType.NORMAL] * len(tokens)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    if stripped := [a["content"] for a in spec.get("added_tokens", []) if a.get("lstrip") or a.get("rstrip")]:
        log.warning(
            "%s: GGUF has no key for the whitespace tokenizer.json strips around %s: llama.cpp keeps it (but for "
            "models it knows by name)",
            source,
            ", ".join(stripped),
        )
    return tokens, types


def _padding(tokens: list[str], n_rows: int) -> list[str]:
    """Names for the embedding rows past the vocabulary: llama.cpp wants one unique token per row; never produced."""
    taken, pads, i = set(tokens), [], 0
    while len(tokens) + len(pads) < n_rows:
        if (pad := f"[PAD{i}]") not in taken:
            pads.append(pad)
        i += 1
    return pads


def _add_byte_level(writer: GGUFWriter, tok: Tokenizer, spec: dict[str, Any], source: str, n_rows: int) -> None:
    """llama.cpp's "gpt2" vocabulary: tokens, merges and the tokenizer.ggml.pre that splits text as ``spec``."""
    # NFC (Qwen2's) is what llama.cpp's own converter also drops: text is NFC almost always.
    if spec["model"]["type"] != "BPE" or (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise UserError(
            f"{source}: GGUF export needs a byte-level BPE tokenizer (BPE model without byte fallback, no "
            "normalizer) or a SentencePiece-style one (BPE with byte fallback)"
        )
    if tok.gguf_pre:
        pre = tok.gguf_pre
        pre_tokenizer_entry(pre)  # still one llama.cpp knows
    else:
        pre = match_pre_tokenizer(spec, source)
    tokens, types = _vocab(tok, spec, source, n_rows)
    pads = _padding(tokens, n_rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + pads)
    writer.add_token_types(types + [TokenType.UNUSED] * len(pads))
    writer.add_token_merges([" ".join(pair) for pair in _merge_pairs(spec["model"])])


def _add_sentencepiece(writer: GGUFWriter, tok: Tokenizer, spec: dict[str, Any], source: str, n_rows: int) -> None:
    """llama.cpp's SentencePiece ("llama") vocabulary for a BPE with byte fallback, as its converter writes one:
    tokens with scores from the merges, <0xXX> BYTE and unk UNKNOWN tokens, add_space_prefix."""
    model = spec["model"]
    prefix = _space_prefix(spec, source)
    tokens, types = _vocab(tok, spec, source, n_rows)
    ids = {t: i for i, t in enumerate(tokens)}
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if missing := [t for t in byte_tokens if t not in ids]:
        raise UserError(f"{source}: byte fallback needs all 256 <0xXX> tokens; missing {', '.join(missing[:4])}")
    for t in byte_tokens:
        types[ids[t]] = TokenType.BYTE
    unk = ids.get(model.get("unk_token"))
    if unk is not None:
        types[unk] = TokenType.UNKNOWN
    scores = _merge_scores(ids, _merge_pairs(model), n_rows)
    # llama.cpp matches USER_DEFINED tokens in the raw text, where HF's normalizer has not yet made spaces U+2581
    # (llama.cpp's converter does the same, and prints them back with their spaces).
    typed = zip(tokens, types, strict=True)
    tokens = [t.replace(SPACE, " ") if ty == TokenType.USER_DEFINED else t for t, ty in typed]
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{source}: an added token with {SPACE} spelled with spaces repeats another token")
    pads = _padding(tokens, n_rows)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + pads)
    writer.add_token_scores(scores)
    writer.add_token_types(types + [TokenType.UNUSED] * len(pads))
    writer.add_add_space_prefix(prefix)
    if unk is not None:
        writer.add_unk_token_id(unk)


def add_tokenizer(writer: GGUFWriter, path: Path, n_rows: int) -> None:
    """Write a tokenizer.json in the llama.cpp form that tokenizes like it, padded to ``n_rows`` tokens: byte-level
    BPE as "gpt2" with its tokenizer.ggml.pre (the one it was imported with, else matched from its
    pre-tokenizer), a SentencePiece-style BPE (byte fallback) as "llama"; then special tokens, add_bos_token and
    chat template."""
    tok = Tokenizer.load(path)
    # As tokenizers reads the file: older spellings (a model without "type", Metaspace's add_prefix_space) current.
    spec = json.loads(tok.hf.to_str())
    if spec["model"]["type"] == "Unigram":
        raise UserError(
            f"{path}: GGUF export of Unigram tokenizers is not supported: llama.cpp's SentencePiece tokenizer "
            "merges pieces by score, which does not reproduce Unigram's best segmentation; export to --format hf"
        )
    if spec["model"].get("byte_fallback"):
        _add_sentencepiece(writer, tok, spec, str(path), n_rows)
    else:
        _add_byte_level(writer, tok, spec, str(path), n_rows)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id if tok.pad_id is not None else tok.eos_id)
    # As Tokenizer.encode_prompt does: BOS only when the tokenizer asks for it; never EOS.
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def tokenizer_from_gguf(kv: dict[str, Any], source: str = "GGUF file") -> Tokenizer | None:
    """Our Tokenizer from a file's vocabulary (None when it has none), tokenizing as llama.cpp does: byte-level
    BPE (tokenizer.ggml.model "gpt2") with the split of its tokenizer.ggml.pre, or SentencePiece ("llama");
    CONTROL tokens special, USER_DEFINED ones added; its special tokens, add_bos_token and chat template."""
    kind = kv.get("tokenizer.ggml.model")
    if kind is None or kind in ("none", "no_vocab"):
        return None
    if kind == "llama":
        return _sentencepiece_from_gguf(kv, source)
    if kind != "gpt2":
        raise UserError(
            f"{source}: GGUF tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 (byte-level BPE), "
            "llama (SentencePiece)"
        )
    pre_name = kv.get("tokenizer.ggml.pre") or "default"
    _, pre = pre_tokenizer_entry(pre_name)
    tokens, types = list(kv["tokenizer.ggml.tokens"]), list(kv["tokenizer.ggml.token_type"])
    while types and types[-1] == TokenType.UNUSED:  # drop padding entries (ours: [PADn])
        tokens, types = tokens[:-1], types[:-1]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{source}: its vocabulary repeats a token, so ids cannot round-trip")
    merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    hf.pre_tokenizer = pre.build()
    hf.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == TokenType.CONTROL])
    hf.add_tokens([AddedToken(t, normalized=False) for t, ty in typed if ty == TokenType.USER_DEFINED])
    return _with_specials(hf, kv, tokens, source, add_bos_default=pre.add_bos, pre=pre_name)


def _with_specials(
    hf: HFTokenizer, kv: dict[str, Any], tokens: list[str], source: str, add_bos_default: bool, pre: str | None
) -> Tokenizer:
    """Our Tokenizer around ``hf`` with the file's BOS/EOS/PAD, add_bos_token and chat template."""

    def name(key: str) -> str | None:
        i = kv.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(
        hf,
        source=source,
        eos=name("eos"),
        bos=name("bos"),
        pad=name("padding"),
        add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=kv.get("tokenizer.chat_template"),
        gguf_pre=pre,
    )


def _sentencepiece_from_gguf(kv: dict[str, Any], source: str) -> Tokenizer:
    """llama.cpp's SentencePiece ("llama") vocabulary as a BPE: llama.cpp merges, among adjacent pieces whose
    concatenation is a token, the one whose token scores highest, so every token is a merge of its two-part
    splits, ranked by its score; a space before the text and after every special token (its
    add_space_prefix; HF's Prepend runs on each segment between added tokens, the same places), spaces as
    U+2581, characters no token covers as <0xXX> byte tokens."""
    tokens, types = list(kv["tokenizer.ggml.tokens"]), list(kv["tokenizer.ggml.token_type"])
    scores = kv.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise UserError(f"{source}: its SentencePiece vocabulary has no tokenizer.ggml.scores for its tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{source}: its vocabulary repeats a token, so ids cannot round-trip")
    mergeable = {TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED}
    ranked = []
    for token, ty in zip(tokens, types, strict=True):
        if ty not in mergeable or len(token) < 2:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[vocab[token]], vocab[token], k, (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == TokenType.UNKNOWN), None)
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    space = [normalizers.Prepend("\u2581")] if kv.get("tokenizer.ggml.add_space_prefix", True) else []
    hf.normalizer = normalizers.Sequence([*space, normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if space else [])
    )
    typed = list(zip(tokens, types, strict=True))
    special = (TokenType.CONTROL, TokenType.UNKNOWN)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in special])
    hf.add_tokens([AddedToken(t, normalized=False) for t, ty in typed if ty == TokenType.USER_DEFINED])
    return _with_specials(hf, kv, tokens, source, add_bos_default=True, pre=None)


@contextlib.contextmanager
def gguf_file(out_path: str | Path, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter for ``out_path`` whose file appears only complete: the block adds keys and tensors, then it is
    written to ``<out>.tmp-<pid>`` beside it and renamed; an error removes the temp file."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise UserError(f"output path is a directory: {out}")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
