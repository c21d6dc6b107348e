"""CLIP: a ViT image tower and a causal text transformer, projected into one embedding space.

The layout is OpenAI CLIP's, so the GGUF export maps it 1:1 onto clip.cpp's names:
  vision.*           the ViT from models/vit.py with pre_ln, class token, no patch bias  -> v.*
  text.token_embd, text.position_embd, text.blocks.N.*, text.post_ln                      -> t.*
  visual_projection, text_projection (Linear, no bias)                                   -> same names
The text tower is pooled at the end-of-text token: captions are "[SOT] words [EOT] pad...", and
under the causal mask nothing after EOT reaches it, so padding never changes an embedding.

Transfer: ``lock_image`` / ``lock_text`` (open_clip's names; LiT locks the image tower) build the model with
that tower and its projection frozen (requires_grad off: no gradients, not in the optimizer); the same sets
of parameters are ``freeze_groups`` "image" and "text" for ``trainer.freeze``. ``layer_id`` gives each tower
its own layer-wise lr decay; the logit scale trains at the full lr.
"""

from __future__ import annotations

import inspect
import math
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abi_train.errors import UserError
from abi_train.models.layers import Block, lora_targets
from abi_train.models.vit import VisionTransformer, adapt_tower, tower_layer_id, tower_patterns

MAX_LOGIT_SCALE = math.log(100.0)  # exp(logit_scale) is clamped to at most 100, as in CLIP


class TextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        norm_eps: float,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.token_embd = nn.Embedding(vocab_size, width)
        self.position_embd = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, int(width * mlp_ratio), norm="layernorm", norm_eps=norm_eps, mlp=act, causal=True)
            for _ in range(layers)
        )
        self.post_ln = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, tokens: torch.Tensor, pool_at: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, width): the final-norm hidden state at position ``pool_at[b]``."""
        x = self.token_embd(tokens) + self.position_embd[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.post_ln(x)
        return x[torch.arange(x.shape[0], device=x.device), pool_at]


class CLIP(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        eot_id: int,
        embed_dim: int = 512,
        image_size: int = 224,
        patch_size: int = 32,
        vision_width: int = 768,
        vision_layers: int = 12,
        vision_heads: int = 12,
        context_length: int = 77,
        text_width: int = 512,
        text_layers: int = 12,
        text_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        loss: str = "clip",
        act: str = "gelu",  # both towers' GELU: gelu | gelu_tanh | quick_gelu (OpenAI's CLIP weights)
        lock_image: bool = False,  # the image tower and visual_projection get no gradients (LiT)
        lock_text: bool = False,  # the text tower and text_projection get no gradients
        name: str = "clip",
    ) -> None:
        super().__init__()
        if lock_image and lock_text:
            raise UserError(
                "model.lock_image and model.lock_text are both true: only the temperature would train; "
                "unlock one tower (LiT locks the image tower alone)"
            )
        if loss not in ("clip", "siglip"):
            raise UserError(f"loss={loss!r} is not known; valid: clip, siglip")
        if not 0 <= eot_id < vocab_size:
            raise UserError(f"model eot_id={eot_id} is outside the vocabulary (vocab_size={vocab_size})")
        self.config = dict(
            arch="clip", name=name, vocab_size=vocab_size, eot_id=eot_id, embed_dim=embed_dim,
            image_size=image_size, patch_size=patch_size, vision_width=vision_width,
            vision_layers=vision_layers, vision_heads=vision_heads, context_length=context_length,
            text_width=text_width, text_layers=text_layers, text_heads=text_heads, mlp_ratio=mlp_ratio,
            norm_eps=norm_eps, loss=loss, act=act, lock_image=lock_image, lock_text=lock_text,
        )  # fmt: skip
        self.eot_id = eot_id
        self.context_length = context_length
        # OpenAI CLIP's image tower: LayerNorm before the blocks, class-token pooling, no conv bias.
        self.vision = VisionTransformer(
            image_size, patch_size, vision_width, vision_layers, vision_heads, mlp_ratio=mlp_ratio,
            num_classes=0, pool="cls", pre_norm=True, patch_bias=False, norm_eps=norm_eps, act=act,
        )  # fmt: skip
        self.text = TextTransformer(
            vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio, norm_eps, act
        )
        self.visual_projection = nn.Linear(vision_width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        # The learned temperature, stored as a log. CLIP starts at 1/0.07; SigLIP at 10 with bias -10
        # (so the many negative pairs start with a small loss). Shape (1,), not 0-dim: FSDP2 shards only
        # parameters with at least one dimension.
        if loss == "siglip":
            self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
            self.logit_bias = nn.Parameter(torch.tensor([-10.0]))
        else:
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
            self.logit_bias = None
        self._init_text()
        groups = self.freeze_groups()
        for name, p in self.named_parameters():
            tower = "image" if lock_image else "text" if lock_text else None
            if tower is not None and any(fnmatchcase(name, pattern) for pattern in groups[tower]):
                p.requires_grad_(False)

    def _init_text(self) -> None:
        # As OpenAI CLIP: small token/position embeddings, projections scaled by 1/sqrt(width).
        # Residual output projections get the GPT-2 1/sqrt(2 * layers) factor.
        nn.init.normal_(self.text.token_embd.weight, std=0.02)
        nn.init.normal_(self.text.position_embd, std=0.01)
        width, layers = self.config["text_width"], self.config["text_layers"]
        for block in self.text.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)
            for b in (block.attn.qkv.bias, block.attn.proj.bias, block.mlp.fc.bias, block.mlp.proj.bias):
                nn.init.zeros_(b)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)
        nn.init.normal_(self.visual_projection.weight, std=self.config["vision_width"] ** -0.5)

    def lora_targets(self) -> list[str]:
        return lora_targets(self)

    @property
    def blocks(self) -> list[nn.Module]:
        """Both towers' blocks, image first (what FSDP2 shards and activation checkpointing wraps)."""
        return [*self.vision.blocks, *self.text.blocks]

    def freeze_groups(self) -> dict[str, list[str]]:
        """Named fnmatch patterns for ``trainer.freeze`` (and the towers ``lock_image`` / ``lock_text`` lock):
        "image" = the vision tower + visual_projection, "text" = the text tower (token and position
        embeddings included) + text_projection."""
        return {
            "image": [*tower_patterns(self.vision, "vision."), "visual_projection.*"],
            "text": [*tower_patterns(self.text, "text."), "text_projection.*"],
        }

    def layer_id(self, name: str) -> tuple[int, int]:
        """(layer, number of layers) for layer-wise lr decay, each tower on its own (models.vit.tower_layer_id);
        the projections are their tower's top layer, the logit scale and bias train at the full lr."""
        c = self.config
        tower, _, rest = name.partition(".")
        if tower == "vision":
            return tower_layer_id(rest, c["vision_layers"])
        if tower == "text":
            return tower_layer_id(rest, c["text_layers"])
        if tower == "visual_projection":
            return c["vision_layers"] + 1, c["vision_layers"]
        if tower == "text_projection":
            return c["text_layers"] + 1, c["text_layers"]
        return 1, 0  # logit_scale, logit_bias: decay ** 0

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token of each row (the last position if a row has none)."""
        is_eot = tokens == self.eot_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, tokens.shape[1] - 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, embed_dim) unit vectors."""
        return F.normalize(self.visual_projection(self.vision.forward_features(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, T <= context_length -> (B, embed_dim) unit vectors."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.context_length}")
        return F.normalize(self.text_projection(self.text(tokens, self.eot_positions(tokens))), dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Unit image and text embeddings, the logit multiplier exp(logit_scale), and the SigLIP bias."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, 100]; called after every optimizer step."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def flops_per_item(self) -> float:
        """Training FLOPs (forward + backward = 3 x forward) for one image-caption pair.

        Image tower: ``VisionTransformer.flops_per_item()``. Text tower at the full context T:
        2 x (matmul weights per layer) x T for the linear layers, plus 4 x T^2 x width per layer for
        the attention scores and the weighted sum (causal masking not discounted). Projections: 2 x
        their weights. The loss's B x B similarity matrix is left out (it is O(B x embed_dim) per pair).
        """
        c = self.config
        t, w = c["context_length"], c["text_width"]
        per_layer = 4 * w * w + 2 * w * int(w * c["mlp_ratio"])  # qkv + out, fc + proj
        text_fwd = c["text_layers"] * (2 * per_layer * t + 4 * t * t * w)
        proj_fwd = 2 * c["embed_dim"] * (w + c["vision_width"])
        return self.vision.flops_per_item() + 3 * (text_fwd + proj_fwd)


def adapt_state_dict(
    state: dict[str, torch.Tensor], source: dict[str, Any], target: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The ``clip`` spec's ``adapt`` hook: the image tower's position embedding resampled to another image size
    (models.vit.adapt_tower); nothing is left to a fresh init."""

    def vision(c: dict[str, Any]) -> dict[str, Any]:
        return {"image_size": c["image_size"], "patch_size": c["patch_size"], "pool": "cls"}

    return adapt_tower(state, vision(source), vision(target), "vision."), set()


def build_clip(**kwargs: Any) -> CLIP:
    """Builder registered as arch "clip" (kwargs as in ``CLIP``; ``model.config`` rebuilds it)."""
    valid = inspect.signature(CLIP).parameters
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown CLIP option(s) model.{', model.'.join(unknown)}; valid: {', '.join(valid)}")
    missing = sorted(k for k in ("vocab_size", "eot_id") if kwargs.get(k) is None)
    if missing:
        raise UserError(f"CLIP needs {', '.join(missing)} (the CLIP task sets them from the tokenizer)")
    return CLIP(**kwargs)
