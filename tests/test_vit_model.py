"""The ViT model: shapes, pooling, stochastic depth, bad sizes, rebuild from config, golden outputs.

Golden values: tests/golden/vit_tiny.safetensors holds a fixed input and the pooled features and logits
of vit-tiny built after torch.manual_seed(0) (its zero head replaced by a seeded normal one, so the
logits carry information). Regenerate after an intended change with
    ABI_REGEN_GOLDEN=1 pytest tests/test_vit_model.py -k golden
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.models.vit import VisionTransformer

GOLDEN = Path(__file__).parent / "golden" / "vit_tiny.safetensors"
TINY = dict(arch="vit", image_size=32, patch_size=8, width=64, depth=2, heads=4, num_classes=12)


def tiny(**overrides) -> VisionTransformer:
    return build_model({**TINY, **overrides})


def test_shapes_and_parameter_names():
    model = tiny()
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 12)
    assert model.forward_features(x).shape == (3, 64)
    assert tiny(num_classes=0)(x).shape == (3, 64)  # no head: forward returns the features
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    # The names clip.cpp's v.* layout maps onto (pre_ln only with pre_norm=True).
    assert names == {"patch_embd", "class_embd", "position_embd", "blocks", "post_ln", "head"}
    assert model.class_embd.shape == (64,)
    assert model.position_embd.shape == (1 + 16, 64)
    assert model.patch_embd.weight.shape == (64, 3, 8, 8)
    clip_like = tiny(num_classes=0, pre_norm=True, patch_bias=False)
    assert isinstance(clip_like.pre_ln, torch.nn.LayerNorm) and clip_like.patch_embd.bias is None
    assert "head.weight" not in clip_like.state_dict()


def test_init_zero_head_and_xavier_projections():
    model = tiny()
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 12))  # uniform logits at the start
    block = model.blocks[0]
    # Xavier-uniform: U(-b, b) with b = sqrt(6 / (fan_in + fan_out)); q, k and v each count as 64 x 64.
    for weight, bound in [(block.attn.qkv.weight[:64], (6 / 128) ** 0.5), (block.mlp.fc.weight, (6 / 320) ** 0.5)]:
        assert weight.abs().max().item() <= bound
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert model.patch_embd.weight.std().item() == pytest.approx(0.88 * 192**-0.5, rel=0.05)  # LeCun, truncated
    assert model.position_embd.std().item() == pytest.approx(0.02, rel=0.1)


def test_cls_and_avg_pooling():
    cls, avg = tiny(), tiny(pool="avg")
    assert avg.class_embd is None and avg.position_embd.shape == (16, 64)
    x = torch.randn(2, 3, 32, 32)
    # avg: the mean of the post-norm patch tokens
    tokens = avg.patch_embd(x).flatten(2).transpose(1, 2) + avg.position_embd
    for block in avg.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(avg.forward_features(x), avg.post_ln(tokens).mean(1))
    # cls: the post-norm class token, which sits at position 0
    tokens = torch.cat([cls.class_embd.expand(2, 1, -1), cls.patch_embd(x).flatten(2).transpose(1, 2)], 1)
    tokens = tokens + cls.position_embd
    for block in cls.blocks:
        tokens = block(tokens)
    torch.testing.assert_close(cls.forward_features(x), cls.post_ln(tokens)[:, 0])


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = tiny(drop_path=0.5, depth=3)
    assert [b.drop_path.p for b in model.blocks] == [0.0, 0.25, 0.5]  # linear in depth
    plain = tiny(depth=3)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))
    model.train()
    outs = [model.forward_features(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_bad_sizes_and_options_are_user_errors():
    with pytest.raises(UserError, match=r"model.image_size=30 is not divisible by model.patch_size=8"):
        tiny(image_size=30)
    with pytest.raises(UserError, match="model.pool='max'"):
        tiny(pool="max")
    with pytest.raises(UserError, match="model.width=64 is not divisible by model.heads=5"):
        tiny(heads=5)
    with pytest.raises(UserError, match="model.colour"):
        tiny(colour=1)
    with pytest.raises(ValueError, match="expected 32x32"):
        tiny()(torch.randn(1, 3, 64, 64))


def test_config_rebuilds_the_same_model():
    model = tiny(pool="avg", drop_path=0.1, name="mine")
    assert model.config["arch"] == "vit" and model.config["name"] == "mine"
    again = build_model(model.config)
    again.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    again.eval()
    torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("name", ["vit-tiny", "vit-s16", "vit-b16"])
def test_shipped_sizes(name):
    cfg = OmegaConf.to_container(compose_cfg(["recipe=vit", f"model={name}"]).model)
    with torch.device("meta"):  # shapes only, no memory
        model = build_model({**cfg, "num_classes": 1000})
    n = sum(p.numel() for p in model.parameters())
    expected = {"vit-tiny": 0.2e6, "vit-s16": 22e6, "vit-b16": 86e6}[name]
    assert 0.5 * expected < n < 1.2 * expected


def test_flops_formula():
    model = tiny()
    d, f, T, P, L = 64, 256, 17, 16, 2
    forward = 2 * T * L * (4 * d * d + 2 * d * f) + 2 * P * 3 * 8 * 8 * d + 2 * d * 12 + 4 * T * T * d * L
    assert model.flops_per_item() == 3 * forward
    # Dominated by 6 x parameters x tokens for a big model (attention is a small part at 197 tokens).
    with torch.device("meta"):
        big = build_model({**TINY, "image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12})
    block_params = sum(p.numel() for p in big.blocks.parameters())
    assert 1.0 < big.flops_per_item() / (6 * block_params * 197) < 1.15


def test_golden_outputs():
    torch.manual_seed(0)
    model = tiny()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.eval()
    if os.environ.get("ABI_REGEN_GOLDEN"):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            tensors = {"input": x, "features": model.forward_features(x).contiguous(), "logits": model(x)}
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(tensors, GOLDEN)
    want = load_file(GOLDEN)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(want["input"]), want["features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(want["input"]), want["logits"], rtol=1e-5, atol=1e-5)
