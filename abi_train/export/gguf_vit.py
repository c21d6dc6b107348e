"""GGUF name map and hyperparameters for ``models.vit`` in clip.cpp's vision-tower layout. The tower and
block maps here are shared: ``gguf_clip`` writes both CLIP towers with them.

Layout checked against monatis/clip.cpp ``clip.cpp`` (the runtime that reads two-tower CLIP GGUF files:
clip.has_text_encoder, ``t.*``, text_projection) and its ``models/convert_hf_to_gguf.py``; llama.cpp
``tools/mtmd/clip-impl.h``, ``tools/mtmd/clip.cpp`` and ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py``.

- Tensors keep PyTorch's (out, in) layout; GGUF stores the shape reversed, so ne[0] = in, which is what
  clip.cpp's ``ggml_mul_mat(w, x)`` needs and what both converters write for q/k/v/out, fc1/fc2 and the
  projections. ``v.class_embd`` is 1-D with no ".weight"; ``position_embd`` has one row per token, class token first.
- FFN names: clip.cpp's converter writes fc1 (width -> hidden) as ``ffn_down`` and fc2 as ``ffn_up``, and
  monatis/clip.cpp applies ``ffn_down`` first (its ``ff_i_w``). We follow that runtime, the one that reads
  two-tower files: mlp.fc -> ffn_down, mlp.proj -> ffn_up. (llama.cpp's mtmd, vision-only, names them the
  other way round and swaps back a pair whose ``ffn_down`` takes width inputs for the LLaVA-style projectors.)
- ``clip.use_gelu`` true: GELU, not CLIP's quick GELU. ggml_gelu is the tanh approximation of our exact GELU.
- The patch conv stays F32 (exact f32 round trip; today's ggml im2col takes F16/F32 kernels, never BF16 or
  quantized ones). Both converters write it F16: the 2023 ggml under monatis/clip.cpp had F16-only conv kernels.
- A ViT without q/k/v biases (``qkv_bias`` false, as some HF/timm ViTs): monatis/clip.cpp loads
  ``attn_{q,k,v}.bias`` as required tensors (llama.cpp's mtmd as optional ones), so zeros are written, which
  compute the same; ``abi_train.vision.qkv_bias`` false tells our reader to drop them again.
Our extensions, which clip.cpp does not read: ``v.patch_embd.bias`` (llama.cpp's name for it), ``v.head.*``
(the classifier), ``abi_train.vision.pool`` (cls | avg: no class token), ``abi_train.vision.pre_norm``,
``abi_train.vision.qkv_bias``, ``abi_train.class_names``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFWriter

from abi_train.errors import UserError

NEEDS_TOKENIZER = False
# Writes "clip", but reads only its own files (abi_train.family = vit); other clip files go to gguf_clip.
ARCHITECTURES: tuple[str, ...] = ()
KEEP_F32 = ("position_embd.weight",)
# ggml's conv (im2col) needs an F16 kernel; clip.cpp aborts on F32 or quantized patch kernels.
KEEP_F16 = ("patch_embd.weight",)

BLOCK = {"norm1": "ln1", "attn.proj": "attn_out", "norm2": "ln2", "mlp.fc": "ffn_down", "mlp.proj": "ffn_up"}
QKV = ("attn_q", "attn_k", "attn_v")  # our fused qkv rows, in order
PARAMS = {"class_embd": "class_embd", "position_embd": "position_embd.weight"}  # bare nn.Parameters


def tower_to_gguf(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One tower's state dict (names relative to the tower) -> GGUF names under ``prefix`` ("v" or "t")."""
    out = {}
    for name, t in state.items():
        if name.startswith("blocks."):
            _, i, *module, kind = name.split(".")
            module = ".".join(module)
            if module == "attn.qkv":  # no GQA in these towers: three equal row blocks
                for part, rows in zip(QKV, t.chunk(3), strict=True):
                    out[f"{prefix}.blk.{i}.{part}.{kind}"] = rows
            else:
                out[f"{prefix}.blk.{i}.{BLOCK[module]}.{kind}"] = t
        else:
            out[f"{prefix}.{PARAMS.get(name, name)}"] = t
    return out


def tower_from_gguf(tensors: dict[str, torch.Tensor], prefix: str, into: str) -> dict[str, torch.Tensor]:
    """The inverse for the tensors under ``prefix``; state dict names start with ``into`` ("" or "vision.")."""
    inverse_block = {v: k for k, v in BLOCK.items()}
    inverse_params = {v: k for k, v in PARAMS.items()}
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, t in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1 :]
        parts = rest.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in QKV:
            qkv[f"{into}blocks.{parts[1]}.attn.qkv.{parts[3]}"][parts[2]] = t
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in inverse_block:
            sd[f"{into}blocks.{parts[1]}.{inverse_block[parts[2]]}.{parts[3]}"] = t
        elif parts[0] == "blk":
            raise UserError(f"GGUF tensor {name!r} has no place in an abi_train transformer block")
        else:
            sd[into + inverse_params.get(rest, rest)] = t
    for name, p in qkv.items():
        if len(p) != 3:
            raise UserError(f"GGUF file lacks one of attn_q/attn_k/attn_v for {name}")
        sd[name] = torch.cat([p[part] for part in QKV])
    return sd


def add_tower(writer: GGUFWriter, tower: str, width: int, layers: int, heads: int, ffn: int, eps: float,
              projection_dim: int) -> None:  # fmt: skip
    writer.add_uint32(f"clip.{tower}.embedding_length", width)
    writer.add_uint32(f"clip.{tower}.feed_forward_length", ffn)
    writer.add_uint32(f"clip.{tower}.block_count", layers)
    writer.add_uint32(f"clip.{tower}.attention.head_count", heads)
    writer.add_float32(f"clip.{tower}.attention.layer_norm_epsilon", eps)
    writer.add_uint32(f"clip.{tower}.projection_dim", projection_dim)


def add_vision_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], projection_dim: int) -> None:
    """clip.vision.* (image size and normalisation from the checkpoint's task metadata) and our pooling keys."""
    c = model.config
    info = meta.get("metadata") or {}
    for key in ("image_mean", "image_std"):
        if len(info.get(key) or ()) != c["in_chans"]:
            raise UserError(f"checkpoint metadata needs {key} with {c['in_chans']} values (the task writes it); "
                            f"got {info.get(key)!r}")  # fmt: skip
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", c["image_size"])
    writer.add_uint32("clip.vision.patch_size", c["patch_size"])
    ffn = int(c["width"] * c["mlp_ratio"])
    add_tower(writer, "vision", c["width"], c["depth"], c["heads"], ffn, c["norm_eps"], projection_dim)
    writer.add_array("clip.vision.image_mean", [float(x) for x in info["image_mean"]])
    writer.add_array("clip.vision.image_std", [float(x) for x in info["image_std"]])
    writer.add_string("abi_train.vision.pool", c["pool"])
    writer.add_bool("abi_train.vision.pre_norm", c["pre_norm"])
    writer.add_bool("abi_train.vision.qkv_bias", c.get("qkv_bias", True))


def need(kv: dict[str, Any], key: str) -> Any:
    if key not in kv:
        raise UserError(f"GGUF file lacks the metadata key {key!r}")
    return kv[key]


def need_tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"GGUF file lacks the tensor {name!r}")
    return tensors[name]


def mlp_ratio(ffn: int, width: int) -> float:
    """A ratio with int(width * ratio) == ffn, as the models compute the hidden size (ffn / width can fall
    one ulp short of that)."""
    ratio = ffn / width
    return ratio if int(width * ratio) == ffn else math.nextafter(ratio, math.inf)


def eps_from_gguf(value: float) -> float:
    return float(f"{value:.7g}")  # stored as float32: 1e-5 comes back as 9.99999975e-06


def tower_from_kv(kv: dict[str, Any], tower: str) -> dict[str, Any]:
    k = f"clip.{tower}."
    width = need(kv, k + "embedding_length")
    return {
        "width": width,
        "layers": need(kv, k + "block_count"),
        "heads": need(kv, k + "attention.head_count"),
        "ffn": need(kv, k + "feed_forward_length"),
        "norm_eps": eps_from_gguf(need(kv, k + "attention.layer_norm_epsilon")),
        "projection_dim": need(kv, k + "projection_dim"),
    }


def vision_from_kv(kv: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The vision tower's ViT kwargs (mlp_ratio aside) from a file's metadata and tensor names."""
    if not need(kv, "clip.has_vision_encoder"):
        raise UserError("GGUF clip file has no vision encoder (clip.has_vision_encoder is false)")
    if not need(kv, "clip.use_gelu"):
        raise UserError("GGUF clip file uses quick GELU (clip.use_gelu is false); abi_train models use GELU")
    t = tower_from_kv(kv, "vision")
    return {
        "image_size": need(kv, "clip.vision.image_size"),
        "patch_size": need(kv, "clip.vision.patch_size"),
        "width": t["width"],
        "depth": t["layers"],
        "heads": t["heads"],
        "pool": kv.get("abi_train.vision.pool", "cls"),
        "pre_norm": kv.get("abi_train.vision.pre_norm", "v.pre_ln.weight" in tensors),
        "patch_bias": "v.patch_embd.bias" in tensors,
        "norm_eps": t["norm_eps"],
        "in_chans": need_tensor(tensors, "v.patch_embd.weight").shape[1],
        "qkv_bias": bool(kv.get("abi_train.vision.qkv_bias", True)),
    }


# --- the ViT family (see gguf_common for the interface) ---


def architecture(model: Any) -> str:
    return "clip"


def add_metadata(writer: GGUFWriter, model: Any, meta: dict[str, Any], tokenizer_path: Path | None) -> None:
    writer.add_description("ViT image classifier (abi_train), clip.cpp vision-tower layout plus v.head")
    writer.add_bool("clip.has_text_encoder", False)
    add_vision_metadata(writer, model, meta, projection_dim=0)  # no projection: clip.cpp's value for none
    n = model.config["num_classes"]
    names = (meta.get("metadata") or {}).get("class_names")
    if n and (not isinstance(names, list) or len(names) != n):
        raise UserError(f"checkpoint metadata needs class_names with {n} entries (one per output); got {names!r}")
    if n:
        writer.add_array("abi_train.class_names", [str(x) for x in names])


def to_gguf(model: Any) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if not model.config.get("qkv_bias", True):  # clip.cpp requires the biases: zeros compute the same
        rows = model.blocks[0].attn.qkv.weight.shape[0] if len(model.blocks) else 0
        for i in range(len(model.blocks)):
            state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(rows)
    return tower_to_gguf(state, "v")


def config_from_gguf(kv: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    v = vision_from_kv(kv, tensors)
    ffn = need(kv, "clip.vision.feed_forward_length")
    head = tensors.get("v.head.weight")
    return {
        "arch": "vit",
        "name": kv.get("general.name", "vit"),
        **v,
        "mlp_ratio": mlp_ratio(ffn, v["width"]),
        "num_classes": 0 if head is None else head.shape[0],
    }


def from_gguf(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    stray = sorted(name for name in tensors if not name.startswith("v."))
    if stray:
        raise UserError(f"GGUF tensor {stray[0]!r} has no place in a ViT")
    sd = tower_from_gguf(tensors, "v", "")
    if not config.get("qkv_bias", True):  # the zeros written for clip.cpp (see the module docstring)
        sd = {k: v for k, v in sd.items() if not k.endswith(".attn.qkv.bias")}
    return sd
