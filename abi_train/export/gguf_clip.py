"""GGUF name map and hyperparameters for ``models.clip``: general.architecture "clip" with both encoders, in
the layout monatis/clip.cpp reads (conventions and sources: see gguf_vit, whose tower and block maps this reuses).

    vision.*  -> v.*  (pre_ln, class token, no patch bias)
    text.*    -> t.*  (token_embd, position_embd, blk.N, post_ln)
    visual_projection.weight, text_projection.weight  (embed_dim, width), clip.cpp's mul_mat layout

The text tower pools at the end-of-text token (``tokenizer.ggml.eos_token_id``, the model's eot_id);
clip.cpp pools at the last position, the same token when captions are fed unpadded ending in it.
The learned temperature is metadata, as the raw parameters: ``abi_train.logit_scale`` (the log of the
logit multiplier) and, for SigLIP, ``abi_train.logit_bias``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.export import gguf_vit as vit
from abi_train.export.gguf_common import add_tokenizer
from abi_train.export.gguf_vit import need, need_tensor

NEEDS_TOKENIZER = True
ARCHITECTURES = ("clip",)
KEEP_F32 = vit.KEEP_F32  # position embeddings (t. and v.)
KEEP_F16 = vit.KEEP_F16  # the patch conv
PROJECTIONS = ("visual_projection.weight", "text_projection.weight")


def architecture(model: Any) -> str:
    return "clip"


def add_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], tokenizer_path: Path) -> None:
    c = model.config
    eos = Tokenizer.load(tokenizer_path).eos_id
    if eos != c["eot_id"]:
        raise UserError(f"{tokenizer_path}: end-of-text id {eos} differs from the model's eot_id {c['eot_id']}")
    writer.add_description("two-tower CLIP model (abi_train)")
    writer.add_bool("clip.has_text_encoder", True)
    vit.add_vision_metadata(writer, model.vision, meta, c["embed_dim"])
    writer.add_uint32("clip.text.context_length", c["context_length"])
    width = c["text_width"]
    vit.add_tower(writer, "text", width, c["text_layers"], c["text_heads"], int(width * c["mlp_ratio"]), c["norm_eps"],
                  c["embed_dim"])  # fmt: skip
    writer.add_float32("abi_train.logit_scale", model.logit_scale.item())
    if model.logit_bias is not None:
        writer.add_float32("abi_train.logit_bias", model.logit_bias.item())
    add_tokenizer(writer, tokenizer_path, c["vocab_size"])


def _tower(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}


def to_gguf(model: Any) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = vit.tower_to_gguf(_tower(state, "vision."), "v") | vit.tower_to_gguf(_tower(state, "text."), "t")
    return out | {name: state[name] for name in PROJECTIONS}  # logit_scale/bias go into the metadata


def config_from_gguf(kv: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if not need(kv, "clip.has_text_encoder"):
        raise UserError("GGUF clip file has no text encoder (clip.has_text_encoder is false)")
    v, t = vit.vision_from_kv(kv, tensors), vit.tower_from_kv(kv, "text")
    v_ffn = need(kv, "clip.vision.feed_forward_length")
    # One mlp_ratio and one norm_eps serve both towers in models.clip.
    ratio = next((r for r in (vit.mlp_ratio(v_ffn, v["width"]), vit.mlp_ratio(t["ffn"], t["width"]))
                  if int(v["width"] * r) == v_ffn and int(t["width"] * r) == t["ffn"]), None)  # fmt: skip
    if ratio is None or v["norm_eps"] != t["norm_eps"]:
        raise UserError("GGUF clip towers differ in FFN ratio or norm epsilon; abi_train's CLIP shares both")
    return {
        "arch": "clip",
        "name": kv.get("general.name", "clip"),
        "vocab_size": need_tensor(tensors, "t.token_embd.weight").shape[0],
        "eot_id": need(kv, "tokenizer.ggml.eos_token_id"),
        "embed_dim": need(kv, "clip.vision.projection_dim"),
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "vision_width": v["width"],
        "vision_layers": v["depth"],
        "vision_heads": v["heads"],
        "context_length": need(kv, "clip.text.context_length"),
        "text_width": t["width"],
        "text_layers": t["layers"],
        "text_heads": t["heads"],
        "mlp_ratio": ratio,
        "norm_eps": v["norm_eps"],
        "loss": "siglip" if "abi_train.logit_bias" in kv else "clip",
    }


def from_gguf(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    stray = sorted(n for n in tensors if not n.startswith(("v.", "t.")) and n not in PROJECTIONS)
    if stray:
        raise UserError(f"GGUF tensor {stray[0]!r} has no place in a CLIP model")
    sd = vit.tower_from_gguf(tensors, "v", "vision.") | vit.tower_from_gguf(tensors, "t", "text.")
    return sd | {name: tensors[name] for name in PROJECTIONS if name in tensors}


def params_from_metadata(kv: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The parameters stored as metadata keys: the logit scale (and SigLIP's bias)."""
    params = {"logit_scale": torch.tensor([float(need(kv, "abi_train.logit_scale"))])}
    if "abi_train.logit_bias" in kv:
        params["logit_bias"] = torch.tensor([float(kv["abi_train.logit_bias"])])
    return params
