"""CLIP from Hugging Face (``CLIPModel``) and open_clip folders, and back to a CLIPModel folder.

Our CLIP (models/clip.py) is OpenAI's layout, as both libraries: a ViT image tower with a pre-norm and no
patch-conv bias, pooled at the class token; a causal text tower pooled at the end-of-text token; two
bias-free projections; a learned log temperature. The renaming uses hf/vit.py's rule tables.

Text pooling, the one place the three disagree in form:
  - ours pools at the first ``eot_id``;
  - HF pools at the first ``text_config.eos_token_id``, except for configs with eos_token_id == 2 (written
    before transformers PR #24773), which pool at the argmax of the ids;
  - open_clip pools at the argmax of the ids.
The argmax is the end-of-text token because OpenAI's tokenizer puts ``<|endoftext|>`` at the last id, so in
those cases ``eot_id`` is the highest id, ``vocab_size - 1``. Both towers share one activation, LayerNorm eps
and MLP ratio in our model; a checkpoint whose towers differ there is a clear error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.hf import HFExport, HFFolder
from abi_train.hf.vit import (
    ACT_OUT,
    Rule,
    act_in,
    image_processor,
    mlp_ratio,
    rename_in,
    rename_out,
    square_size,
)
from abi_train.weights import check_weights, expected_shapes

READS = ("CLIPModel", "open_clip")

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's normalisation (HF's and open_clip's default)
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
LEGACY_EOS = 2  # see the module docstring

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (a config.json may leave keys out).
HF_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
HF_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _tower_rules(theirs: str, ours: str, attn: dict[str, str], rest: dict[str, str]) -> list[Rule]:
    b, o = f"{theirs}{{i}}.", f"{ours}blocks.{{i}}."
    rules = [Rule(f"{b}{k}", f"{o}{v}") for k, v in rest.items()]
    return rules + [Rule(f"{b}{k}", f"{o}attn.qkv.{{p}}", kind) for kind, k in attn.items()]


HF_BLOCK = {
    "layer_norm1.{p}": "norm1.{p}",
    "self_attn.out_proj.{p}": "attn.proj.{p}",
    "layer_norm2.{p}": "norm2.{p}",
    "mlp.fc1.{p}": "mlp.fc.{p}",
    "mlp.fc2.{p}": "mlp.proj.{p}",
}
HF_QKV = {"q": "self_attn.q_proj.{p}", "k": "self_attn.k_proj.{p}", "v": "self_attn.v_proj.{p}"}
HF_RULES = [
    Rule("text_model.embeddings.token_embedding.weight", "text.token_embd.weight"),
    Rule("text_model.embeddings.position_embedding.weight", "text.position_embd"),
    *_tower_rules("text_model.encoder.layers.", "text.", HF_QKV, HF_BLOCK),
    Rule("text_model.final_layer_norm.{p}", "text.post_ln.{p}"),
    Rule("vision_model.embeddings.class_embedding", "vision.class_embd"),
    Rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embd.weight"),
    Rule("vision_model.embeddings.position_embedding.weight", "vision.position_embd"),
    Rule("vision_model.pre_layrnorm.{p}", "vision.pre_ln.{p}"),  # sic: HF's spelling
    *_tower_rules("vision_model.encoder.layers.", "vision.", HF_QKV, HF_BLOCK),
    Rule("vision_model.post_layernorm.{p}", "vision.post_ln.{p}"),
    Rule("visual_projection.weight", "visual_projection.weight"),
    Rule("text_projection.weight", "text_projection.weight"),
    Rule("logit_scale", "logit_scale", "scalar"),
]
HF_IGNORE = (r".*\.position_ids",)  # older transformers saved these index buffers

OC_BLOCK = {
    "ln_1.{p}": "norm1.{p}",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.{p}": "attn.proj.{p}",
    "ln_2.{p}": "norm2.{p}",
    "mlp.c_fc.{p}": "mlp.fc.{p}",
    "mlp.c_proj.{p}": "mlp.proj.{p}",
}
OC_RULES = [
    Rule("visual.conv1.weight", "vision.patch_embd.weight"),
    Rule("visual.class_embedding", "vision.class_embd"),
    Rule("visual.positional_embedding", "vision.position_embd"),
    Rule("visual.ln_pre.{p}", "vision.pre_ln.{p}"),
    *_tower_rules("visual.transformer.resblocks.", "vision.", {}, OC_BLOCK),
    Rule("visual.ln_post.{p}", "vision.post_ln.{p}"),
    Rule("visual.proj", "visual_projection.weight", "T"),  # open_clip: x @ proj, (width, embed)
    Rule("token_embedding.weight", "text.token_embd.weight"),
    Rule("positional_embedding", "text.position_embd"),
    *_tower_rules("transformer.resblocks.", "text.", {}, OC_BLOCK),
    Rule("ln_final.{p}", "text.post_ln.{p}"),
    Rule("text_projection", "text_projection.weight", "T"),
    Rule("logit_scale", "logit_scale", "scalar"),
]
OC_IGNORE = (r"attn_mask", r".*\.attn_mask")  # the causal-mask buffer some versions saved

# open_clip options our CLIP reproduces only at the library's default value.
OC_VISION_FIXED: dict[str, Any] = {
    "ls_init_value": None,
    "patch_dropout": 0.0,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "output_tokens": False,
    "timm_model_name": None,
    "global_average_pool": False,
    "input_patchnorm": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}
OC_TEXT_FIXED: dict[str, Any] = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "output_tokens": False,
    "hf_model_name": None,
    "act_kwargs": None,
    "norm_kwargs": None,
}
OC_MODEL_FIXED: dict[str, Any] = {"custom_text": False, "init_logit_bias": None}
OC_VISION_KNOWN = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
OC_TEXT_KNOWN = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "tokenizer_kwargs"}
OC_MODEL_KNOWN = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "cast_dtype", "init_logit_scale"}


def _check_options(cfg: dict[str, Any], fixed: dict[str, Any], known: set[str], where: str, src: str) -> None:
    for key, value in cfg.items():
        if key.startswith(("hf_", "attn_pooler_")) and key not in fixed:
            continue  # only used with hf_model_name / attentional_pool, which are checked below
        if key in fixed:
            if value != fixed[key] and not (fixed[key] is None and value in (False, 0, {})):
                raise UserError(
                    f"{src}: open_clip option {where}{key}={value!r} is not supported (only {fixed[key]!r})"
                )
        elif key not in known:
            raise UserError(f"{src}: open_clip option {where}{key} is not supported by abi_train's CLIP")


def _same(text: Any, vision: Any, what: str, src: str) -> Any:
    if text != vision:
        raise UserError(
            f"{src}: the CLIP towers differ in {what} (text {text!r}, vision {vision!r}); abi_train's CLIP shares it"
        )
    return text


def _hf_config(folder: HFFolder) -> dict[str, Any]:
    c, src = folder.config, str(folder.path / "config.json")
    # transformers < 4.29 wrote text_config_dict / vision_config_dict.
    t = {**HF_TEXT, **(c.get("text_config") or c.get("text_config_dict") or {})}
    v = {**HF_VISION, **(c.get("vision_config") or c.get("vision_config_dict") or {})}
    act = _same(
        act_in(t["hidden_act"], "text_config.hidden_act", src),
        act_in(v["hidden_act"], "vision_config.hidden_act", src),
        "hidden_act",
        src,
    )
    eps = _same(float(t["layer_norm_eps"]), float(v["layer_norm_eps"]), "layer_norm_eps", src)
    ratio = _same(
        mlp_ratio(t["intermediate_size"], t["hidden_size"], src),
        mlp_ratio(v["intermediate_size"], v["hidden_size"], src),
        "MLP ratio (intermediate_size / hidden_size)",
        src,
    )
    eos = t["eos_token_id"]
    if isinstance(eos, list):
        eos = eos[0]
    vocab = int(t["vocab_size"])
    # Legacy configs pool at argmax(ids): the last id is OpenAI's <|endoftext|> (module docstring).
    eot_id = vocab - 1 if eos == LEGACY_EOS else int(eos)
    return dict(
        arch="clip",
        name=folder.path.name,
        vocab_size=vocab,
        eot_id=eot_id,
        embed_dim=int(c.get("projection_dim", 512)),
        image_size=square_size(v["image_size"], "vision_config.image_size", src),
        patch_size=square_size(v["patch_size"], "vision_config.patch_size", src),
        vision_width=v["hidden_size"],
        vision_layers=v["num_hidden_layers"],
        vision_heads=v["num_attention_heads"],
        context_length=t["max_position_embeddings"],
        text_width=t["hidden_size"],
        text_layers=t["num_hidden_layers"],
        text_heads=t["num_attention_heads"],
        mlp_ratio=ratio,
        norm_eps=eps,
        loss="clip",
        act=act,
    )


def _oc_config(folder: HFFolder) -> dict[str, Any]:
    src = str(folder.path / "open_clip_config.json")
    m = folder.config.get("model_cfg")
    if not isinstance(m, dict):
        raise UserError(f"{src} has no model_cfg object")
    v, t = dict(m.get("vision_cfg") or {}), dict(m.get("text_cfg") or {})
    _check_options(m, OC_MODEL_FIXED, OC_MODEL_KNOWN, "", src)
    _check_options(v, OC_VISION_FIXED, OC_VISION_KNOWN, "vision_cfg.", src)
    _check_options(t, OC_TEXT_FIXED, OC_TEXT_KNOWN, "text_cfg.", src)
    if not isinstance(v.get("layers", 12), int):
        raise UserError(f"{src}: vision_cfg.layers={v['layers']!r}: a ResNet image tower, abi_train's CLIP is a ViT")
    width, head_width = int(v.get("width", 768)), int(v.get("head_width", 64))
    if width % head_width:
        raise UserError(f"{src}: vision_cfg.width={width} is not a multiple of head_width={head_width}")
    ratio = _same(float(t.get("mlp_ratio", 4.0)), float(v.get("mlp_ratio", 4.0)), "mlp_ratio", src)
    vocab = int(t.get("vocab_size", 49408))
    return dict(
        arch="clip",
        name=folder.path.name,
        vocab_size=vocab,
        eot_id=vocab - 1,  # open_clip pools at argmax(ids): <|endoftext|> is the last id
        embed_dim=int(m.get("embed_dim", 512)),
        image_size=square_size(v.get("image_size", 224), "vision_cfg.image_size", src),
        patch_size=square_size(v.get("patch_size", 16), "vision_cfg.patch_size", src),
        vision_width=width,
        vision_layers=int(v.get("layers", 12)),
        vision_heads=width // head_width,
        context_length=int(t.get("context_length", 77)),
        text_width=int(t.get("width", 512)),
        text_layers=int(t.get("layers", 12)),
        text_heads=int(t.get("heads", 8)),
        mlp_ratio=ratio,
        norm_eps=1e-5,  # open_clip's LayerNorm default
        loss="clip",
        act="quick_gelu" if m.get("quick_gelu") else "gelu",
    )


# --- the adapter contract -------------------------------------------------------------------------------


def config_from_hf(folder: HFFolder) -> dict[str, Any]:
    """Builder kwargs of our CLIP from config.json (CLIPModel) or open_clip_config.json."""
    return _oc_config(folder) if folder.architecture == "open_clip" else _hf_config(folder)


def state_dict_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    rules, ignore = (OC_RULES, OC_IGNORE) if folder.architecture == "open_clip" else (HF_RULES, HF_IGNORE)
    state, origin = rename_in(folder.tensors, rules, ignore, str(folder.path))
    check_weights(state, expected_shapes(config), str(folder.path), origin)
    return state


def tokenizer_from_hf(folder: HFFolder) -> Tokenizer | None:
    """The folder's tokenizer.json (HF CLIP folders and most open_clip hub folders have one), else None:
    the CLIP task then needs data.tokenizer."""
    if not (folder.path / "tokenizer.json").is_file():
        return None
    return Tokenizer.load(folder.path / "tokenizer.json")


def metadata_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, Any]:
    """image_mean/std (preprocessor_config.json or open_clip's preprocess_cfg; OpenAI's by default),
    image_size, context_length and eot_id."""
    if folder.architecture == "open_clip":
        pre = folder.config.get("preprocess_cfg") or {}
        mean, std = pre.get("mean"), pre.get("std")
    else:
        pre = folder.json("preprocessor_config.json") or {}
        mean, std = pre.get("image_mean"), pre.get("image_std")
    return {
        "image_size": config["image_size"],
        "image_mean": [float(x) for x in (mean or OPENAI_MEAN)],
        "image_std": [float(x) for x in (std or OPENAI_STD)],
        "context_length": config["context_length"],
        "eot_id": config["eot_id"],
    }


def to_hf(model: nn.Module, meta: dict[str, Any], tokenizer: Tokenizer | None = None) -> HFExport:
    """Our CLIP as a CLIPModel folder (text_config / vision_config, preprocessor_config.json, tokenizer)."""
    c = model.config
    if getattr(model, "logit_bias", None) is not None:
        raise UserError("HF export: a SigLIP-trained CLIP (logit_bias) has no CLIPModel form; CLIPModel has no bias")
    if c["eot_id"] == LEGACY_EOS:
        raise UserError(
            "HF export: eot_id=2 would make transformers pool at argmax(ids) (its legacy case), not at the "
            "end-of-text token"
        )
    info = meta.get("metadata") or {}
    sot = (info.get("tokenizer") or {}).get("bos_id")
    hidden = {"text": int(c["text_width"] * c["mlp_ratio"]), "vision": int(c["vision_width"] * c["mlp_ratio"])}
    common = {"hidden_act": ACT_OUT[c["act"]], "layer_norm_eps": c["norm_eps"], "projection_dim": c["embed_dim"]}
    text = {
        "model_type": "clip_text_model",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["text_width"],
        "intermediate_size": hidden["text"],
        "num_hidden_layers": c["text_layers"],
        "num_attention_heads": c["text_heads"],
        "max_position_embeddings": c["context_length"],
        "eos_token_id": c["eot_id"],
        "bos_token_id": c["eot_id"] if sot is None else sot,
        "pad_token_id": c["eot_id"],  # captions are padded with end-of-text
        **common,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": c["vision_width"],
        "intermediate_size": hidden["vision"],
        "num_hidden_layers": c["vision_layers"],
        "num_attention_heads": c["vision_heads"],
        "image_size": c["image_size"],
        "patch_size": c["patch_size"],
        "num_channels": 3,
        **common,
    }
    scale = float(model.logit_scale.detach().reshape(()))
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c["embed_dim"],
        "logit_scale_init_value": scale if math.isfinite(scale) else 2.6592,
        "text_config": text,
        "vision_config": vision,
        "dtype": "float32",
    }
    tensors = rename_out({k: v.detach().float() for k, v in model.state_dict().items()}, HF_RULES)
    files = {"preprocessor_config.json": image_processor(info, c["image_size"], "CLIPImageProcessor")}
    return HFExport(config, tensors, files, tokenizer)
