"""GGUF pieces shared by every family: output types, per-tensor type choice, quantization, the
byte-level BPE tokenizer (both directions) and provenance.

A family module (``gguf_llm``; ``gguf_vit`` and ``gguf_clip`` follow the same shape) provides only its
name map and hyperparameters:

    NEEDS_TOKENIZER: bool
    ARCHITECTURES: tuple[str, ...]                      general.architecture values it writes/reads
    KEEP_F32: tuple[str, ...]                           name suffixes of 2-D+ tensors kept in F32
    KEEP_F16: tuple[str, ...]   (optional)              name suffixes stored F16 unless the outtype is f32
    architecture(model) -> str
    add_metadata(writer, model, meta, tokenizer_path)   "{arch}.*" keys (+ add_tokenizer here)
    to_gguf(model) -> dict[str, Tensor]                 GGUF name -> tensor (PyTorch layout)
    config_from_gguf(kv, tensors) -> dict               builder kwargs (with "arch") from a file
    from_gguf(tensors, config) -> dict[str, Tensor]     our state dict from GGUF tensors
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers
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


def add_tokenizer(writer: GGUFWriter, path: Path, n_rows: int) -> None:
    """Write a byte-level BPE tokenizer.json in llama.cpp's "gpt2" form, padded to ``n_rows`` tokens."""
    tok = Tokenizer.load(path)
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if (
        spec["model"].get("type") != "BPE"
        or spec.get("normalizer")
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
    ):
        raise UserError(
            f"{path}: GGUF export needs a byte-level BPE tokenizer with the GPT-2 split "
            "(ByteLevel pre-tokenizer, no prefix space, no normalizer)"
        )
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise UserError(f"{path}: token ids are not contiguous from 0; GGUF needs one token per id")
    if len(tokens) > n_rows:
        raise UserError(f"{path}: tokenizer has {len(tokens)} tokens but the model embeds only {n_rows}")
    types = [TokenType.NORMAL] * len(tokens)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    # Padded vocab: llama.cpp wants one unique token per embedding row; these are never produced.
    taken, i = set(tokens), 0
    while len(tokens) < n_rows:
        if (pad := f"[PAD{i}]") not in taken:
            tokens.append(pad)
            types.append(TokenType.UNUSED)
        i += 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id if tok.pad_id is not None else tok.eos_id)
    # Tokenizer.encode adds no special tokens (documents are only separated by EOS), so neither may llama.cpp.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def tokenizer_from_gguf(kv: dict[str, Any]) -> Tokenizer | None:
    """Rebuild our Tokenizer from a file written by ``add_tokenizer`` (None for other tokenizers)."""
    if kv.get("tokenizer.ggml.model") != "gpt2" or kv.get("tokenizer.ggml.pre") != "gpt-2":
        return None
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    while types and types[-1] == TokenType.UNUSED:  # drop the padding entries
        tokens, types = tokens[:-1], types[:-1]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == TokenType.CONTROL])
    hf.add_tokens([AddedToken(t, normalized=False) for t, ty in typed if ty == TokenType.USER_DEFINED])
    return Tokenizer(hf, source="gguf")
