"""ViT from Hugging Face (``ViTForImageClassification``, ``ViTModel``) and timm folders, and back to HF.

Our ViT (models/vit.py) and both libraries compute the same network: patch conv, class token first, learned
positions, pre-norm blocks, final LayerNorm, class-token pooling, linear head. Only names and a few layouts
differ: HF splits q/k/v (ours is one fused [q|k|v] projection, as timm's ``attn.qkv``), HF and timm keep a
leading batch dim of 1 on ``cls_token`` / position embeddings.

The renaming is table-driven (``Rule``); the same tables serve import and export, and CLIP (hf/clip.py)
reuses the machinery. Anything our model cannot represent (layer scale, register tokens, average pooling,
...) is a UserError that names the option rather than a silent approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from abi_train.errors import UserError
from abi_train.hf import HFExport, HFFolder
from abi_train.weights import check_weights, expected_shapes

READS = ("ViTForImageClassification", "ViTModel", "timm")

# HF hidden_act -> our `act` (gelu_new / gelu_pytorch_tanh are both the tanh approximation).
ACT_IN = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
ACT_OUT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# transformers' ViTConfig defaults: a config.json may leave any of them out.
HF_VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}
IMAGENET_STANDARD = [0.5, 0.5, 0.5]  # ViTImageProcessor's default mean and std


# --- the renaming machinery (shared with hf/clip.py) -----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One tensor (or, with ``{p}``, a module's weight and bias) under their name and ours.

    ``{i}`` is a block index, ``{p}`` weight|bias. ``kind`` says how the layouts differ:
    "" same, "q"/"k"/"v" one third of our fused qkv rows, "flat" theirs (1, 1, D) vs ours (D,),
    "row" theirs (1, N, D) vs ours (N, D), "T" transposed (open_clip's projections), "scalar" theirs 0-dim
    vs ours (1,) (the logit scale: FSDP2 shards only parameters with a dimension).
    """

    theirs: str
    ours: str
    kind: str = ""


def _pattern(template: str) -> re.Pattern[str]:
    text = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(text)


def _fill(template: str, match: re.Match[str]) -> str:
    groups = match.groupdict()
    return template.replace("{i}", groups.get("i") or "").replace("{p}", groups.get("p") or "")


def _to_ours(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "flat":
        return t.reshape(-1)
    if kind == "row":
        return t.reshape(t.shape[-2], t.shape[-1]) if t.ndim == 3 and t.shape[0] == 1 else t
    if kind == "T":
        return t.T.contiguous() if t.ndim == 2 else t
    if kind == "scalar":
        return t.reshape(1)
    return t


def _to_theirs(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "flat":
        return t.reshape(1, 1, -1)
    if kind == "row":
        return t.unsqueeze(0)
    if kind == "T":
        return t.T.contiguous()
    if kind == "scalar":
        return t.reshape(())
    return t


def rename_in(
    tensors: dict[str, torch.Tensor], rules: list[Rule], ignore: tuple[str, ...], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Their state dict -> ours, plus our name -> their name (for error messages).

    A tensor no rule knows is a UserError naming it; ``ignore`` holds regexes of names that carry nothing
    our model needs (e.g. ``position_ids`` buffers, ViTModel's unused pooler)."""
    compiled = [(_pattern(r.theirs), r) for r in rules]
    skip = [re.compile(p) for p in ignore]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for pattern, rule in compiled:
            m = pattern.fullmatch(name)
            if m:
                ours = _fill(rule.ours, m)
                origin.setdefault(ours, name)
                if rule.kind in ("q", "k", "v"):
                    parts.setdefault(ours, {})[rule.kind] = t
                else:
                    out[ours] = _to_ours(t, rule.kind)
                break
        else:
            if not any(p.fullmatch(name) for p in skip):
                raise UserError(f"{source}: tensor {name!r} has no place in abi_train's model (unknown name)")
    for ours, qkv in parts.items():
        missing = [k for k in "qkv" if k not in qkv]
        if missing:
            raise UserError(f"{source}: {origin[ours]!r} comes without its {'/'.join(missing)} part(s)")
        out[ours] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out, origin


def rename_out(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Our state dict -> theirs, splitting the fused qkv rows into the q/k/v rules' tensors."""
    by_ours: dict[str, list[tuple[re.Pattern[str], Rule]]] = {}
    for r in rules:
        by_ours.setdefault(r.ours, []).append((_pattern(r.ours), r))
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        for group in by_ours.values():
            m = group[0][0].fullmatch(name)
            if not m:
                continue
            if group[0][1].kind in ("q", "k", "v"):
                pieces = dict(zip("qkv", t.chunk(3), strict=True))
                for _, rule in group:
                    out[_fill(rule.theirs, m)] = pieces[rule.kind].contiguous()
            else:
                out[_fill(group[0][1].theirs, m)] = _to_theirs(t, group[0][1].kind)
            break
        else:
            raise AssertionError(f"no export rule for {name}")  # a bug: every parameter has a rule
    return out


def square_size(value: Any, key: str, source: str) -> int:
    """HF allows image_size / patch_size as [h, w]; our model takes square sizes only."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{source}: {key}={list(value)} is not square; abi_train's ViT takes square sizes")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{source}: {key}={value!r} is not a positive integer")
    return value


def mlp_ratio(hidden: int, width: int, source: str) -> float:
    """The ratio our model multiplies back (int(width * ratio)) to exactly ``hidden``."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise UserError(f"{source}: intermediate size {hidden} is not reproducible from width {width}")
    return ratio


def act_in(value: Any, key: str, source: str) -> str:
    if value not in ACT_IN:
        raise UserError(f"{source}: {key}={value!r} is not supported; supported: {', '.join(ACT_IN)}")
    return ACT_IN[value]


# --- Hugging Face ViT -----------------------------------------------------------------------------------


def _hf_rules(prefix: str) -> list[Rule]:
    e, b = f"{prefix}embeddings.", f"{prefix}encoder.layer.{{i}}."
    return [
        Rule(f"{e}cls_token", "class_embd", "flat"),
        Rule(f"{e}position_embeddings", "position_embd", "row"),
        Rule(f"{e}patch_embeddings.projection.{{p}}", "patch_embd.{p}"),
        Rule(f"{b}layernorm_before.{{p}}", "blocks.{i}.norm1.{p}"),
        Rule(f"{b}attention.attention.query.{{p}}", "blocks.{i}.attn.qkv.{p}", "q"),
        Rule(f"{b}attention.attention.key.{{p}}", "blocks.{i}.attn.qkv.{p}", "k"),
        Rule(f"{b}attention.attention.value.{{p}}", "blocks.{i}.attn.qkv.{p}", "v"),
        Rule(f"{b}attention.output.dense.{{p}}", "blocks.{i}.attn.proj.{p}"),
        Rule(f"{b}layernorm_after.{{p}}", "blocks.{i}.norm2.{p}"),
        Rule(f"{b}intermediate.dense.{{p}}", "blocks.{i}.mlp.fc.{p}"),
        Rule(f"{b}output.dense.{{p}}", "blocks.{i}.mlp.proj.{p}"),
        Rule(f"{prefix}layernorm.{{p}}", "post_ln.{p}"),
        Rule("classifier.{p}", "head.{p}"),
    ]


def _hf_config(folder: HFFolder) -> dict[str, Any]:
    c = {**HF_VIT_DEFAULTS, **folder.config}
    src = str(folder.path / "config.json")
    width = c["hidden_size"]
    config = dict(
        arch="vit",
        name=folder.path.name,
        image_size=square_size(c["image_size"], "image_size", src),
        patch_size=square_size(c["patch_size"], "patch_size", src),
        width=width,
        depth=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        mlp_ratio=mlp_ratio(c["intermediate_size"], width, src),
        num_classes=0,
        pool="cls",
        pre_norm=False,
        patch_bias=True,
        norm_eps=float(c["layer_norm_eps"]),
        in_chans=c["num_channels"],
        act=act_in(c["hidden_act"], "hidden_act", src),
        qkv_bias=bool(c["qkv_bias"]),
    )
    if folder.architecture == "ViTForImageClassification":
        labels = c.get("id2label")
        config["num_classes"] = len(labels) if labels else int(c.get("num_labels", 2))  # HF's default: 2 labels
    return config


# --- timm ViT -------------------------------------------------------------------------------------------

# timm's ViT sizes by name: (embed_dim, depth, num_heads). timm stores no head count in the weights.
TIMM_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
TIMM_SIZES["huge"] = (1280, 32, 16)
TIMM_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)")
# model_args our model reproduces only at timm's default value (an explicit default is fine).
TIMM_FIXED: dict[str, Any] = {
    "class_token": True,
    "global_pool": "token",
    "no_embed_class": False,
    "reg_tokens": 0,
    "fc_norm": None,
    "init_values": None,
    "qk_norm": False,
    "dynamic_img_size": False,
    "dynamic_img_pad": False,
    "proj_bias": True,
    "pos_embed": "learn",
    "final_norm": True,
    "weight_init": "",
    "fix_init": False,
}
TIMM_TUNABLE = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
TIMM_RULES = [
    Rule("cls_token", "class_embd", "flat"),
    Rule("pos_embed", "position_embd", "row"),
    Rule("patch_embed.proj.{p}", "patch_embd.{p}"),
    Rule("norm_pre.{p}", "pre_ln.{p}"),
    Rule("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    Rule("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    Rule("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    Rule("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    Rule("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc.{p}"),
    Rule("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.proj.{p}"),
    Rule("norm.{p}", "post_ln.{p}"),
    Rule("head.{p}", "head.{p}"),
]


def _timm_config(folder: HFFolder) -> dict[str, Any]:
    c, src = folder.config, str(folder.path / "config.json")
    name = str(c["architecture"])
    m = TIMM_NAME.fullmatch(name)
    if not m:
        raise UserError(
            f"{src}: timm architecture {name!r} is not supported; supported: vit_{{tiny,small,base,large,huge}}"
            "_patch<P>_<size> (plain ViTs with a class token)"
        )
    width, depth, heads = TIMM_SIZES[m.group(1)]
    args: dict[str, Any] = dict(c.get("model_args") or {})
    if c.get("global_pool") is not None:
        args.setdefault("global_pool", c["global_pool"])
    for key, default in TIMM_FIXED.items():
        if key in args and args[key] != default and not (key == "fc_norm" and args[key] is False):
            raise UserError(
                f"{src}: timm option {key}={args[key]!r} is not supported by abi_train's ViT (only {default!r})"
            )
    known = {"embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio", "pre_norm", "num_classes"}
    known |= {"in_chans", "qkv_bias"} | set(TIMM_FIXED) | set(TIMM_TUNABLE)
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"{src}: timm option(s) {', '.join(unknown)} are not supported by abi_train's ViT")
    width = int(args.get("embed_dim", width))
    num_classes = args.get("num_classes", c.get("num_classes", 1000))
    return dict(
        arch="vit",
        name=name,
        image_size=square_size(args.get("img_size", int(m.group(3))), "img_size", src),
        patch_size=square_size(args.get("patch_size", int(m.group(2))), "patch_size", src),
        width=width,
        depth=int(args.get("depth", depth)),
        heads=int(args.get("num_heads", heads)),
        mlp_ratio=float(args.get("mlp_ratio", 4.0)),
        num_classes=int(num_classes),
        pool="cls",
        pre_norm=bool(args.get("pre_norm", False)),
        patch_bias=not bool(args.get("pre_norm", False)),  # timm: no conv bias when pre_norm (CLIP-style)
        norm_eps=1e-6,  # timm's ViT LayerNorm
        in_chans=int(args.get("in_chans", 3)),
        act="gelu",
        qkv_bias=bool(args.get("qkv_bias", True)),
    )


# --- the adapter contract -------------------------------------------------------------------------------


def config_from_hf(folder: HFFolder) -> dict[str, Any]:
    """Builder kwargs of our ViT from the folder's config.json (HF or timm)."""
    return _timm_config(folder) if folder.architecture == "timm" else _hf_config(folder)


def state_dict_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors = folder.tensors
    if folder.architecture == "timm":
        rules, ignore = TIMM_RULES, ()
    else:
        prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
        rules, ignore = _hf_rules(prefix), (rf"{re.escape(prefix)}pooler\..*",)  # ViTModel's pooler: unused
    state, origin = rename_in(tensors, rules, ignore, str(folder.path))
    check_weights(state, expected_shapes(config), str(folder.path), origin)
    return state


def tokenizer_from_hf(folder: HFFolder) -> None:
    return None  # images only


def metadata_from_hf(folder: HFFolder, config: dict[str, Any]) -> dict[str, Any]:
    """class_names (HF id2label, timm label_names), image_mean/std (preprocessor_config.json or timm's
    pretrained_cfg; absent when the folder does not say), image_size."""
    meta: dict[str, Any] = {"image_size": config["image_size"]}
    c = folder.config
    if folder.architecture == "timm":
        pre = c.get("pretrained_cfg") or {}
        mean, std, names = pre.get("mean"), pre.get("std"), c.get("label_names")
    else:
        pre = folder.json("preprocessor_config.json") or {}
        mean, std = pre.get("image_mean"), pre.get("image_std")
        labels = c.get("id2label") or {}
        names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))] if labels else None
    if mean is not None and std is not None:
        meta["image_mean"], meta["image_std"] = [float(x) for x in mean], [float(x) for x in std]
    if names and len(names) == config["num_classes"] and all(isinstance(n, str) for n in names):
        meta["class_names"] = list(names)
    return meta


def to_hf(model: nn.Module, meta: dict[str, Any], tokenizer: Any = None) -> HFExport:
    """Our ViT as a ViTForImageClassification folder (config with id2label, preprocessor_config.json)."""
    c = model.config
    if c["pool"] != "cls":
        raise UserError("HF export: a ViT with pool=avg (no class token) has no ViTForImageClassification form")
    if c["pre_norm"]:
        raise UserError("HF export: a ViT with pre_norm=true has no ViTForImageClassification form (no pre-norm)")
    info = meta.get("metadata") or {}
    n = c["num_classes"]
    names = info.get("class_names") or []
    names = names if len(names) == n else [f"LABEL_{i}" for i in range(n)]
    config = {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c["width"],
        "num_hidden_layers": c["depth"],
        "num_attention_heads": c["heads"],
        "intermediate_size": int(c["width"] * c["mlp_ratio"]),
        "hidden_act": ACT_OUT[c["act"]],
        "layer_norm_eps": c["norm_eps"],
        "image_size": c["image_size"],
        "patch_size": c["patch_size"],
        "num_channels": c["in_chans"],
        "qkv_bias": c.get("qkv_bias", True),
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": c["patch_size"],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "dtype": "float32",
    }
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if not c["patch_bias"]:  # HF's patch conv always has a bias: zeros compute the same
        state["patch_embd.bias"] = torch.zeros(c["width"])
    tensors = rename_out(state, _hf_rules("vit."))
    files = {"preprocessor_config.json": image_processor(info, c["image_size"], "ViTImageProcessor")}
    return HFExport(config, tensors, files)


def image_processor(info: dict[str, Any], size: int, kind: str) -> dict[str, Any]:
    """preprocessor_config.json: resize to the model's size, scale to 0..1, normalise with the run's values."""
    out: dict[str, Any] = {
        "image_processor_type": kind,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(info.get("image_mean") or IMAGENET_STANDARD),
        "image_std": list(info.get("image_std") or IMAGENET_STANDARD),
    }
    if kind == "CLIPImageProcessor":
        out |= {"size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": {"height": size, "width": size}}
        out |= {"resample": 3, "do_convert_rgb": True}
    else:
        out |= {"size": {"height": size, "width": size}, "resample": 2}
    return out
