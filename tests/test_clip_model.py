"""CLIP model: shapes, unit embeddings, end-of-text pooling, the logit-scale clamp, SigLIP init,
parameter names for the GGUF layout, and golden embeddings of the seeded clip-tiny.

Golden values: tests/golden/clip_tiny.safetensors holds the embeddings that ``build_model(TINY)`` after
``torch.manual_seed(0)`` gives for the seeded inputs of ``test_golden_embeddings`` (so they change with
the ViT's init too). Regenerate after an intended change: ``ABI_REGEN_GOLDEN=1 pytest tests/test_clip_model.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from abi_train.errors import UserError
from abi_train.models import build_model

GOLDEN = Path(__file__).parent / "golden" / "clip_tiny.safetensors"
EOT = 1
# configs/model/clip-tiny.yaml with the two values the task fills in.
TINY = dict(
    arch="clip", vocab_size=300, eot_id=EOT, embed_dim=64, image_size=32, patch_size=8, vision_width=64,
    vision_layers=2, vision_heads=4, context_length=32, text_width=64, text_layers=2, text_heads=4,
)  # fmt: skip


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({**TINY, **kw}).eval()


def tokens(batch: int = 3, eot_at: tuple[int, ...] = (5, 9, 31)) -> torch.Tensor:
    t = torch.randint(2, 300, (batch, 32), generator=torch.Generator().manual_seed(1))
    for row, pos in enumerate(eot_at):
        t[row, pos] = EOT
    return t


def test_shapes_and_unit_norm():
    model = tiny()
    images = torch.randn(3, 3, 32, 32)
    img, txt, scale, bias = model(images, tokens())
    assert img.shape == txt.shape == (3, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert bias is None
    assert model.config["arch"] == "clip" and build_model(model.config).config == model.config


def test_eot_pooling_ignores_tokens_after_eot():
    model = tiny()
    t = tokens()
    changed = t.clone()
    changed[0, 6:] = 7  # after the EOT at 5
    changed[1, 10:] = EOT  # EOT padding after the EOT at 9: still pooled at the first one
    torch.testing.assert_close(model.encode_text(changed), model.encode_text(t))
    before = t.clone()
    before[0, 4] = 8  # before the EOT: the embedding must change
    assert not torch.allclose(model.encode_text(before)[0], model.encode_text(t)[0])


def test_eot_positions():
    model = tiny()
    t = tokens(eot_at=(5, 9, 31))
    t[1, 20] = EOT
    assert model.eot_positions(t).tolist() == [5, 9, 31]
    t[2, 31] = 4  # no EOT at all: the last position
    assert model.eot_positions(t)[2].item() == 31


def test_shorter_token_rows_are_accepted_longer_rejected():
    model = tiny()
    assert model.encode_text(tokens()[:, :12]).shape == (3, 64)
    with pytest.raises(ValueError):
        model.encode_text(torch.full((1, 33), EOT))


def test_clamp_logit_scale():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def test_siglip_parameters():
    model = tiny(loss="siglip")
    _, _, scale, bias = model(torch.randn(2, 3, 32, 32), tokens(2, (3, 4)))
    assert scale.item() == pytest.approx(10.0, rel=1e-5)
    assert bias.item() == -10.0
    assert "logit_bias" in dict(model.named_parameters())


def test_parameter_names_fit_the_clip_gguf_layout():
    names = set(dict(tiny().named_parameters()))
    for want in (
        "vision.patch_embd.weight", "vision.class_embd", "vision.position_embd", "vision.pre_ln.weight",
        "vision.post_ln.weight", "vision.blocks.1.mlp.fc.weight", "text.token_embd.weight",
        "text.position_embd", "text.blocks.1.attn.qkv.weight", "text.post_ln.bias",
        "visual_projection.weight", "text_projection.weight", "logit_scale",
    ):  # fmt: skip
        assert want in names, want
    assert "vision.patch_embd.bias" not in names  # OpenAI CLIP's patch conv has no bias
    assert "visual_projection.bias" not in names and "text_projection.bias" not in names


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="model.wdith"):
        build_model({**TINY, "wdith": 3})
    with pytest.raises(UserError, match="eot_id"):
        build_model({**TINY, "eot_id": None})
    with pytest.raises(UserError, match="siglip"):
        build_model({**TINY, "loss": "triplet"})


def test_flops_per_item():
    model = tiny()
    # Text tower alone, by hand: 2 layers x (2 x 32 tokens x (4*64^2 + 2*64*256) + 4 x 32^2 x 64), x3.
    text = 3 * 2 * (2 * 32 * (4 * 64 * 64 + 2 * 64 * 256) + 4 * 32 * 32 * 64)
    projections = 3 * 2 * 64 * (64 + 64)
    assert model.flops_per_item() == model.vision.flops_per_item() + text + projections


def test_golden_embeddings():
    model = tiny()
    g = torch.Generator().manual_seed(2)
    inputs = {"images": torch.randn(2, 3, 32, 32, generator=g), "tokens": tokens(2, (6, 20))}
    with torch.no_grad():
        img, txt, _, _ = model(inputs["images"], inputs["tokens"])
    if os.environ.get("ABI_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file({"image_embeddings": img, "text_embeddings": txt}, GOLDEN)
    want = load_file(GOLDEN)
    torch.testing.assert_close(img, want["image_embeddings"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, want["text_embeddings"], rtol=1e-4, atol=1e-5)
