"""Vision Transformer (Dosovitskiy et al. 2020): image classifier and CLIP's image tower.

    image -> patch_embd (conv, stride = patch) -> [class_embd] + patches -> + position_embd
          -> pre_ln (CLIP only) -> blocks (pre-norm, bidirectional) -> post_ln -> pool -> head

Parameter names follow clip.cpp's ``v.*`` GGUF layout (patch_embd, class_embd, position_embd, pre_ln,
blk.N, post_ln), so the exporter only renames ``blocks.N`` and splits the fused qkv.

Transfer (``adapt_state_dict``, the ``vit`` spec's ``adapt`` hook): a source of another class count leaves
the head to this model's fresh init; one of another image size has its position embedding resampled over
the patch grid (``resample_position_embd``, bicubic, class token kept). ``layer_id`` serves layer-wise lr
decay (optim.py), ``freeze_groups`` names the backbone for a linear probe (``trainer.freeze=[backbone]``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abi_train.errors import UserError
from abi_train.models.layers import Block, lora_targets

GELUS = ("gelu", "gelu_tanh", "quick_gelu")


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,  # 0: no head, forward() returns the pooled features
        pool: str = "cls",  # "cls": the class token's output; "avg": mean over patch tokens (no class token)
        pre_norm: bool = False,  # LayerNorm before the blocks (OpenAI CLIP has one, the ViT paper does not)
        patch_bias: bool = True,  # CLIP's patch conv has no bias
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path: float = 0.0,  # stochastic depth of the last block; earlier blocks scale linearly from 0
        in_chans: int = 3,
        act: str = "gelu",  # the MLP's GELU: gelu (exact) | gelu_tanh | quick_gelu (OpenAI CLIP)
        qkv_bias: bool = True,  # biases on q, k and v (HF ViTConfig.qkv_bias, timm's qkv_bias)
        name: str = "vit",  # free text, written into GGUF's general.name
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise UserError(f"model.image_size={image_size} is not divisible by model.patch_size={patch_size}")
        if pool not in ("cls", "avg"):
            raise UserError(f"model.pool={pool!r} is not valid; valid: cls, avg")
        if act not in GELUS:
            raise UserError(f"model.act={act!r} is not valid; valid: {', '.join(GELUS)}")
        if width % heads:
            raise UserError(f"model.width={width} is not divisible by model.heads={heads}")
        self.config: dict[str, Any] = dict(
            arch="vit",
            name=name,
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            pool=pool,
            pre_norm=pre_norm,
            patch_bias=patch_bias,
            norm_eps=norm_eps,
            dropout=dropout,
            drop_path=drop_path,
            in_chans=in_chans,
            act=act,
            qkv_bias=qkv_bias,
        )
        self.image_size, self.pool = image_size, pool
        self.num_patches = (image_size // patch_size) ** 2

        self.patch_embd = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=patch_bias)
        self.class_embd = nn.Parameter(torch.zeros(width)) if pool == "cls" else None
        self.position_embd = nn.Parameter(torch.zeros(self.num_patches + (pool == "cls"), width))
        self.embd_dropout = nn.Dropout(dropout)
        self.pre_ln = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                int(width * mlp_ratio),
                norm="layernorm",
                norm_eps=norm_eps,
                mlp=act,
                bias=True,
                qkv_bias=qkv_bias,
                causal=False,
                dropout=dropout,
                drop_path=drop_path * i / max(depth - 1, 1),
            )
            for i in range(depth)
        )
        self.post_ln = nn.LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # As the original ViT (google-research/vision_transformer): Xavier-uniform projections (q, k and v
        # each on its own), LeCun-normal patch conv, normal(0.02) positions and class token, zero biases and
        # head. Unlike timm's fixed std 0.02 (tuned for width 768) it scales with the width, which matters for
        # small models: vit-tiny on the shapes set reached 71% val top-1 after 600 steps instead of 27%.
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for weight in (*attn.qkv.weight.data.chunk(3), attn.proj.weight, mlp.fc.weight, mlp.proj.weight):
                nn.init.xavier_uniform_(weight)
            for bias in (attn.qkv.bias, attn.proj.bias, mlp.fc.bias, mlp.proj.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
        fan_in = self.patch_embd.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embd.weight, std=fan_in**-0.5, a=-2 * fan_in**-0.5, b=2 * fan_in**-0.5)
        if self.patch_embd.bias is not None:
            nn.init.zeros_(self.patch_embd.bias)
        nn.init.trunc_normal_(self.position_embd, std=0.02)
        if self.class_embd is not None:
            nn.init.trunc_normal_(self.class_embd, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, width) pooled features after post_ln."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(images.shape)}")
        # The patch conv as one matmul over the cut-out patches (same weights, same result): with stride ==
        # kernel a convolution only adds cuDNN's layout conversions (measured: docs/PERF.md).
        B, C, H, W = images.shape
        p = self.patch_embd.stride[0]
        patches = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        x = F.linear(patches, self.patch_embd.weight.flatten(1), self.patch_embd.bias)  # (B, num_patches, width)
        if self.class_embd is not None:
            x = torch.cat([self.class_embd.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.pre_ln(self.embd_dropout(x + self.position_embd))
        for block in self.blocks:
            x = block(x)
        x = self.post_ln(x)
        return x[:, 0] if self.pool == "cls" else x.mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits (or (B, width) features when num_classes == 0)."""
        return self.head(self.forward_features(images))

    def layer_id(self, name: str) -> tuple[int, int]:
        """(layer, number of layers) of parameter ``name`` for layer-wise lr decay: see ``tower_layer_id``."""
        return tower_layer_id(name, self.config["depth"])

    def lora_targets(self) -> list[str]:
        return lora_targets(self)

    def freeze_groups(self) -> dict[str, list[str]]:
        """Named fnmatch patterns for ``trainer.freeze``: ``backbone`` is every parameter but the head's
        (``trainer.freeze=[backbone]``: a linear probe)."""
        return {"backbone": tower_patterns(self, exclude=("head",))}

    def flops_per_item(self) -> float:
        """Training FLOPs per image (the item of a ViT): 3x the forward (backward ~ 2x forward).

        Forward = 2 x (multiply-adds of every matmul) + attention scores and mixing:
        2*T*L*(4*d^2 + 2*d*f) for the blocks (qkv 3d^2 + out d^2, MLP 2*d*f), 2*P*C*p^2*d for the patch
        conv, 2*d*classes for the head, and 4*T^2*d per layer for QK^T and attn@V. T tokens, P patches,
        L layers, d width, f MLP hidden. Norms, softmax, biases and GELU are ignored.
        """
        c = self.config
        d, L, p = c["width"], c["depth"], c["patch_size"]
        f = int(d * c["mlp_ratio"])
        P = self.num_patches
        T = P + (c["pool"] == "cls")
        forward = 2 * T * L * (4 * d * d + 2 * d * f) + 2 * P * c["in_chans"] * p * p * d
        forward += 2 * d * c["num_classes"] + 4 * T * T * d * L
        return 3.0 * forward


# Layer 0 of a tower: a ViT's embeddings and pre-norm, a text tower's token and position embeddings.
EMBEDDINGS = ("patch_embd", "class_embd", "position_embd", "pre_ln", "token_embd")


def tower_layer_id(name: str, depth: int) -> tuple[int, int]:
    """BEiT / timm layer ids of a tower's parameter (``name`` relative to the tower): the embeddings (and the
    pre-norm, which acts on them) 0, ``blocks.i`` i + 1, the rest (final norm, head) depth + 1."""
    first, _, rest = name.partition(".")
    if first == "blocks":
        return int(rest.split(".", 1)[0]) + 1, depth
    return (0 if first in EMBEDDINGS else depth + 1), depth


def tower_patterns(module: nn.Module, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
    """fnmatch patterns covering every parameter of ``module`` (names under ``prefix``), one per top-level
    child or parameter, leaving out the children named in ``exclude``."""
    patterns: list[str] = []
    for name, _ in module.named_parameters():
        first, dot, _ = name.partition(".")
        pattern = f"{prefix}{first}.*" if dot else f"{prefix}{first}"
        if first not in exclude and pattern not in patterns:
            patterns.append(pattern)
    return patterns


def resample_position_embd(
    pos: torch.Tensor, old_grid: int, new_grid: int, prefix_tokens: int, antialias: bool = True
) -> torch.Tensor:
    """(prefix + old_grid^2, D) -> (prefix + new_grid^2, D): the patch rows resampled bicubically over the 2-D
    grid to the new size (align_corners off), the class token's row kept, as timm's ``resample_abs_pos_embed``
    with its default ``antialias=True``, which we follow for training. HF's ``interpolate_pos_encoding`` is
    the same with ``antialias=False``; the two differ in both directions, not only when shrinking: PyTorch's
    antialiased bicubic uses PIL's kernel (a = -0.5) where the plain one uses a = -0.75."""
    if old_grid == new_grid:
        return pos
    head, grid = pos[:prefix_tokens], pos[prefix_tokens:]
    if grid.shape[0] != old_grid * old_grid:
        raise ValueError(f"position embedding of {grid.shape[0]} patch rows is not a {old_grid}x{old_grid} grid")
    dim = grid.shape[-1]
    image = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([head, grid])


def adapt_tower(
    state: dict[str, torch.Tensor], source: dict[str, Any], target: dict[str, Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """One ViT's weights (under ``prefix``) from a ``source`` config to ``target``'s image size: the position
    embedding resampled (same patch size; another one stays a shape mismatch, named by the weights check)."""
    old, new, patch = source["image_size"], target["image_size"], target["patch_size"]
    if old == new or source["patch_size"] != patch:
        return state
    key = f"{prefix}position_embd"
    prefix_tokens = int(source.get("pool", "cls") == "cls")
    return {**state, key: resample_position_embd(state[key], old // patch, new // patch, prefix_tokens)}


def adapt_state_dict(
    state: dict[str, torch.Tensor], source: dict[str, Any], target: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The ``vit`` spec's ``adapt`` hook: a pretrained ViT's weights for a model of another image size and/or
    class count. Returns the state and the parameter names the model keeps from its own init (a new head,
    zero-initialised as every fresh ViT head; the ViT task says so in one line)."""
    state = adapt_tower(state, source, target)
    if (source.get("num_classes") or 0) == (target.get("num_classes") or 0):
        return state, set()
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state, ({"head.weight", "head.bias"} if target.get("num_classes") else set())


def build_vit(**kwargs: Any) -> VisionTransformer:
    """Builder registered as arch "vit" (kwargs as in ``VisionTransformer``; ``model.config`` rebuilds it)."""
    valid = inspect.signature(VisionTransformer).parameters
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown ViT option(s) model.{', model.'.join(unknown)}; valid: {', '.join(valid)}")
    return VisionTransformer(**kwargs)
