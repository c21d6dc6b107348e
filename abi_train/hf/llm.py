"""Hugging Face adapter for ``models.gpt``: the ``*ForCausalLM`` folders of every LLM family
(``models/families``), read and written through the family's config map and tensor-name table.

- HF's separate (or differently fused) q/k/v and gate/up projections become our fused ``attn.qkv`` and
  separate ``mlp.gate``/``mlp.up`` (``models.qkv``). Both sides use rotate-half RoPE, so no row permutation
  (that is only for llama.cpp, see export/gguf_llm.py).
- A tied head is absent from HF files; our state dict then takes the embedding for ``lm_head.weight``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.hf import HFExport, HFFolder
from abi_train.models.families import Family, families, family, family_for_hf
from abi_train.models.gpt import GPTConfig, gpt_config
from abi_train.models.qkv import add_zero_biases, check_parts, from_parts, group, to_parts, ungroup

READS = tuple(a for fam in families().values() for a in fam.hf_architectures)

# Non-weight tensors some HF versions store: rotary caches, GPT-2's causal mask.
IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def _where(folder: HFFolder) -> str:
    return str(folder.path / folder.config_name)


def _family(folder: HFFolder) -> Family:
    fam = family_for_hf(folder.architecture)
    assert fam is not None, folder.architecture  # hf.load_hf_folder picks this adapter by READS
    return fam


def config_from_hf(folder: HFFolder) -> dict[str, Any]:
    """Builder kwargs for ``models.gpt`` from config.json; options we cannot compute are a UserError."""
    fam = _family(folder)
    mapped = fam.config_from_hf(folder.config, _where(folder))
    return {"arch": "gpt", "style": fam.name, **mapped, "name": folder.path.resolve().name}


def _conv1d(fam: Family, name: str, t: torch.Tensor) -> torch.Tensor:
    """The other orientation of a weight the family stores (in, out) (GPT-2's Conv1D); others as they are."""
    stem, _, kind = name.rpartition(".")
    inner = stem.removeprefix(f"{fam.hf_layers}.").partition(".")[2]
    return t.t().contiguous() if kind == "weight" and inner in fam.hf_transposed else t


def _with_prefix(fam: Family, name: str) -> str:
    """GPT2Model files leave out GPT2LMHeadModel's ``transformer.``: put it back where it belongs."""
    prefix = fam.hf_optional_prefix
    if not prefix or name.startswith(prefix) or name.rpartition(".")[0] in fam.hf_top:
        return name
    return prefix + name


def state_dict_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The folder's tensors under our names; an unknown name, a missing or wrong-shaped tensor is named."""
    fam, cfg = _family(folder), gpt_config(config)
    named = ((_with_prefix(fam, k), t) for k, t in folder.tensors.items() if not IGNORED.search(k))
    tensors = ((k, _conv1d(fam, k, t)) for k, t in named)
    layer = re.compile(rf"^{re.escape(fam.hf_layers)}\.(\d+)\.(.+)\.(weight|bias)$")
    try:
        parts, origin = ungroup(tensors, cfg, fam.hf_block, fam.hf_top, layer)
    except KeyError as e:
        raise UserError(f"{folder.path}: tensor {e.args[0]} is not one a {folder.architecture} model has") from None
    except UserError as e:
        raise UserError(f"{folder.path}: {e}") from None
    if cfg.tie_embeddings and "tok_embd.weight" in parts:
        parts["lm_head.weight"] = parts["tok_embd.weight"]  # a stored copy of a tied head is the same tensor
        origin["lm_head.weight"] = origin["tok_embd.weight"]
    check_parts(parts, config, f"{folder.path}", origin)
    return from_parts(parts)


def _token_for(tok_ids: Any, hf: Any) -> str | None:
    if isinstance(tok_ids, list):
        tok_ids = tok_ids[0] if tok_ids else None
    if not isinstance(tok_ids, int):
        return None
    return hf.id_to_token(tok_ids)


def tokenizer_from_hf(folder: HFFolder) -> Tokenizer | None:
    """tokenizer.json with its tokenizer_config.json; BOS/EOS default to the ids of generation_config.json
    or config.json when the tokenizer config does not name them. None when the folder has no tokenizer."""
    if not (folder.path / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(folder.path / "tokenizer.json"))
    except Exception:  # noqa: BLE001 (Tokenizer.load below reports it as a UserError)
        return Tokenizer.load(folder.path)
    ids = {**folder.config, **(folder.json("generation_config.json") or {})}
    defaults = {}
    for key in ("eos", "bos", "pad"):
        token = _token_for(ids.get(f"{key}_token_id"), hf)
        if token is not None:
            defaults[f"{key}_token"] = token
    return Tokenizer.load(folder.path, defaults=defaults)


def metadata_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, Any]:
    return {"source_architecture": folder.architecture}


# --- export ----------------------------------------------------------------------------------------------


def _hf_config(c: GPTConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    # null without a tokenizer: a config class's own ids (SmolLM3's pad 128004) may lie outside this vocabulary
    ids: dict[str, Any] = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
    common |= {"dtype": "float32", "use_cache": True, "initializer_range": 0.02, **ids}
    return family(c.style).hf_config(c) | common


def to_hf(model: Any, meta: dict[str, Any], tokenizer: Tokenizer | None) -> HFExport:
    """``model`` (a models.gpt.GPT) as its family's HF folder."""
    c = model.cfg
    fam = family(c.style)
    reason = fam.refusal(c, "hf")
    if reason:
        raise UserError(reason)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        state.pop("lm_head.weight")  # transformers ties it to the embedding
    parts = to_parts(state, c)
    if fam.hf_needs_biases and not c.bias:
        add_zero_biases(parts)
    top = {ours: theirs for theirs, ours in fam.hf_top.items()}
    out = group(parts, c, fam.hf_block, top, lambda i: f"{fam.hf_layers}.{i}.")
    out = {k: _conv1d(fam, k, v).contiguous() for k, v in out.items()}
    files: dict[str, dict[str, Any]] = {}
    if tokenizer is not None:
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "_from_model_config": True}
        if tokenizer.pad_id is not None:
            gen["pad_token_id"] = tokenizer.pad_id
        files["generation_config.json"] = gen
    return HFExport(_hf_config(c, tokenizer), out, files, tokenizer)
