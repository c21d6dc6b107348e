"""ViT and CLIP transfer: a fresh head for new classes, a resampled position embedding for a new image size
(checked against transformers' ``interpolate_pos_encoding``), layer-wise lr decay, the freeze groups of a
linear probe, ViTs without q/k/v biases (HF, timm, GGUF) and CLIP's tower locks (LiT)."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, read_metrics
from omegaconf import OmegaConf
from test_hf_vision import TOL, hf_clip_folder, hf_vit_folder, imported, max_diff, perturb
from transformers import ViTForImageClassification, ViTModel

from abi_train.data.pairs import SOT
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.synthetic_pairs import SyntheticPairs
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.export import export_gguf
from abi_train.hf import vit as hf_vit
from abi_train.hf import write_hf_folder
from abi_train.models import build_model
from abi_train.models.vit import resample_position_embd
from abi_train.optim import build_optimizer, build_scheduler, param_groups
from abi_train.sources import load_pretrained
from abi_train.tasks import task_class
from abi_train.trainer import Trainer
from abi_train.weights import load_pretrained_weights, model_overrides

SHAPES = ["data.num_train=32", "data.num_val=16", "trainer.batch_size=8", "trainer.num_workers=0"]
QUIET = ["trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false"]


def tiny_vit(**kw) -> torch.nn.Module:
    return build_model(dict(arch="vit", image_size=32, patch_size=8, width=32, depth=2, heads=4, num_classes=3) | kw)


def tiny_clip(**kw) -> torch.nn.Module:
    config = dict(arch="clip", vocab_size=50, eot_id=3, embed_dim=8, image_size=16, patch_size=8)
    config |= dict(vision_width=16, vision_layers=3, vision_heads=2, context_length=8, text_width=16, text_layers=2)
    return build_model(config | {"text_heads": 2} | kw)


def vit_trainer(tmp_path: Path, folder: Path, *overrides: str) -> Trainer:
    cfg = compose_cfg(["recipe=vit", f"init_from={folder}", *SHAPES, *QUIET, "trainer.max_steps=1", *overrides])
    task = task_class("vit")(cfg, DistInfo(), model_overrides(overrides))  # as the CLI passes them
    trainer = Trainer(cfg, task, tmp_path / "run", DistInfo())
    trainer.setup()
    return trainer


# --- a new image size: the position embedding resampled -------------------------------------------------


def test_resampled_position_embedding_matches_transformers_interpolation(tmp_path):
    """An HF ViT at 32 px, imported and resized by us to 48 px (4x4 -> 6x6 patches), computes what
    transformers computes on 48 px images with interpolate_pos_encoding=True: the same grid, class token and
    bicubic resize to the new size when, as HF, without antialiasing (timm's default, ours for training, is
    checked below). The position embeddings are scaled up so that a wrong grid shows in the logits."""
    folder = hf_vit_folder(tmp_path / "vit")
    ref = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ref.vit.embeddings.position_embeddings.mul_(20.0)
    ref.save_pretrained(folder)
    pretrained = load_pretrained(folder)
    source = pretrained.load_weights()["position_embd"]
    model = build_model({**pretrained.model_config, "image_size": 48}).eval()
    load_pretrained_weights(model, pretrained)
    assert model.position_embd.shape == (1 + 6 * 6, 32) and torch.equal(model.position_embd[0], source[0])
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=images, interpolate_pos_encoding=True).logits
        # HF's resized table itself (its embeddings module's own interpolation), to compare grids exactly.
        table = ref.vit.embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), 48, 48)[0]
        timm_default = max_diff(model.position_embd, table)
        model.position_embd.copy_(resample_position_embd(source, 4, 6, 1, antialias=False))
        assert max_diff(model.position_embd, table) <= 1e-5
        assert max_diff(model(images), want) <= TOL
        grid = source[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        for wrong in (grid.transpose(-1, -2), grid):  # a transposed grid; corners aligned
            resized = F.interpolate(wrong, size=(6, 6), mode="bicubic", align_corners=wrong is grid)
            assert max_diff(resized.permute(0, 2, 3, 1).reshape(36, -1), table[1:]) > 0.1
    # timm's antialiased kernel (ours for training) differs from HF's, when enlarging too (documented).
    assert 0.01 < timm_default < max_diff(table[1:], source[1:].repeat(3, 1)[:36])


@pytest.mark.parametrize("old,new", [(4, 6), (8, 3)])
def test_resampling_follows_timm_antialiased_bicubic(old, new):
    """timm's resample_abs_pos_embed: bicubic to the new size, antialias on, align_corners off, the class
    token's row first and unchanged."""
    pos = torch.randn(1 + old * old, 4, generator=torch.Generator().manual_seed(0))
    out = resample_position_embd(pos, old, new, prefix_tokens=1)
    grid = pos[1:].reshape(1, old, old, 4).permute(0, 3, 1, 2)
    timm = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(out[1:], timm.permute(0, 2, 3, 1).reshape(new * new, 4), atol=1e-6)
    assert torch.equal(out[0], pos[0]) and torch.equal(resample_position_embd(pos, old, old, 1), pos)
    avg = resample_position_embd(pos[1:], old, new, prefix_tokens=0)  # pool=avg: no class token
    assert torch.allclose(avg, out[1:])


# --- a new class count: a fresh head ---------------------------------------------------------------------


@pytest.mark.parametrize("headless", [False, True])
def test_new_classes_get_a_fresh_head_and_every_other_weight(tmp_path, capsys, headless):
    """An HF ViT with a 5-class head (or a ViTModel without one) on the 12 shapes: a zero-initialised 12-class
    head, said in one line; the image size changes too (32 -> 48 px), also said; the rest is the source's."""
    folder = hf_vit_folder(tmp_path / "vit", num_labels=5)
    if headless:
        ViTModel.from_pretrained(folder, add_pooling_layer=False).save_pretrained(folder)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["ViTModel"]
    source = imported(folder).state_dict()
    trainer = vit_trainer(tmp_path, folder, "data.image_size=48")
    err = capsys.readouterr().err
    has = "has no head" if headless else "has 5"
    assert f"new classifier head: 12 classes (init_from {has})" in err
    assert "position embedding resampled: 32 -> 48 px (4x4 -> 6x6 patches" in err
    state = trainer.raw_model.state_dict()
    assert state["head.weight"].shape == (12, 32) and not state["head.weight"].any() and not state["head.bias"].any()
    assert trainer.raw_model.config["num_classes"] == 12 and trainer.raw_model.config["image_size"] == 48
    for name, t in source.items():
        if not name.startswith(("head.", "position_embd")):
            assert torch.equal(state[name], t), name
    assert torch.equal(state["position_embd"][0], source["position_embd"][0])
    batch = next(iter(trainer.task.train_loader(GlobalBatchSampler(trainer.task.num_train_items(), 8, seed=0))))
    assert batch["images"].shape[-1] == 48 and torch.isfinite(trainer.task.loss(trainer.raw_model, batch)[0])


def test_bad_transfer_inputs_are_one_line(tmp_path):
    folder = hf_vit_folder(tmp_path / "vit", num_labels=12)
    with pytest.raises(UserError, match=r"data.image_size=36 is not a multiple of the patch size 8 .* e.g. 32"):
        vit_trainer(tmp_path, folder, "data.image_size=36")
    with pytest.raises(UserError, match="model.num_classes=7 but the data has 12 classes"):
        vit_trainer(tmp_path, folder, "model.num_classes=7")
    model = tiny_vit()
    for bad in (0, 1.5, -0.5, "x", True):
        cfg = OmegaConf.merge(compose_cfg(["recipe=vit"]).optim, {"layer_decay": bad})
        with pytest.raises(UserError, match=r"optim.layer_decay=.* is not valid; valid: null \(off\) or a number in"):
            build_optimizer(model, cfg)
    with pytest.raises(UserError, match="lock_image and model.lock_text are both true"):
        tiny_clip(lock_image=True, lock_text=True)


# --- layer-wise learning-rate decay -----------------------------------------------------------------------


def vit_layer(name: str, depth: int) -> int:
    """The BEiT/timm layer of our ViT's parameter, written out (not the code's rule)."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 0 if name.split(".")[0] in ("patch_embd", "class_embd", "position_embd", "pre_ln") else depth + 1


def lr_of(groups: list[dict], model: torch.nn.Module) -> dict[str, float]:
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_layer_decay_gives_each_layer_its_lr_and_the_schedule_scales_them_all():
    model, decay, lr = tiny_vit(depth=3), 0.75, 2e-3
    cfg = OmegaConf.merge(compose_cfg(["recipe=vit"]).optim, {"lr": lr, "layer_decay": decay, "warmup_steps": 4})
    optimizer = build_optimizer(model, cfg)
    lrs = lr_of(optimizer.param_groups, model)
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    for name, value in lrs.items():
        assert value == pytest.approx(lr * decay ** (3 + 1 - vit_layer(name, 3))), name
    assert lrs["head.weight"] == pytest.approx(lr) and lrs["patch_embd.weight"] == pytest.approx(lr * decay**4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)  # the group the trainer logs: the full lr
    for g in optimizer.param_groups:  # decay on matrices only, as without layer decay
        assert g["weight_decay"] == (0.0 if any(p.ndim < 2 or p.shape[0] == 17 for p in g["params"]) else 0.05)
    scheduler = build_scheduler(optimizer, cfg, max_steps=10)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    factor = 3 / 4  # warmup step 2 of 4
    assert lr_of(optimizer.param_groups, model) == pytest.approx({n: v * factor for n, v in lrs.items()})
    plain = param_groups(model, 0.05)  # off: the two groups of before, no lr of their own
    assert len(plain) == 2 and "lr" not in plain[0]


def test_layer_decay_runs_per_clip_tower_and_over_gpt_blocks():
    model, d = tiny_clip(), 0.5
    lrs = lr_of(param_groups(model, 0.1, 1.0, d), model)
    assert lrs["vision.patch_embd.weight"] == pytest.approx(d**4) and lrs["vision.pre_ln.weight"] == pytest.approx(d**4)
    assert lrs["vision.blocks.0.attn.qkv.weight"] == pytest.approx(d**3)
    assert lrs["vision.post_ln.weight"] == 1.0 and lrs["visual_projection.weight"] == 1.0
    assert lrs["text.token_embd.weight"] == pytest.approx(d**3) and lrs["text.position_embd"] == pytest.approx(d**3)
    assert lrs["text.blocks.0.mlp.fc.weight"] == pytest.approx(d**2) and lrs["text.blocks.1.mlp.fc.weight"] == d
    assert lrs["text_projection.weight"] == 1.0 and lrs["logit_scale"] == 1.0
    gpt = build_model(OmegaConf.to_container(compose_cfg(["recipe=llm", "model=tiny"]).model) | {"vocab_size": 64})
    n = len(gpt.blocks)
    lrs = lr_of(param_groups(gpt, 0.1, 1.0, d), gpt)
    assert lrs["tok_embd.weight"] == pytest.approx(d ** (n + 1)) and lrs["norm_f.weight"] == 1.0
    assert lrs[f"blocks.{n - 1}.attn.qkv.weight"] == pytest.approx(d)


# --- freeze groups: a linear probe, CLIP towers -----------------------------------------------------------


def covered(model: torch.nn.Module, patterns: list[str]) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(fnmatchcase(n, p) for p in patterns)}


def test_freeze_groups_cover_exactly_their_parameters():
    vit = tiny_vit(pre_norm=True)
    names = {n for n, _ in vit.named_parameters()}
    assert covered(vit, vit.freeze_groups()["backbone"]) == names - {"head.weight", "head.bias"}
    clip = tiny_clip(loss="siglip")
    groups = clip.freeze_groups()
    image, text = covered(clip, groups["image"]), covered(clip, groups["text"])
    assert image == {n for n, _ in clip.named_parameters() if n.startswith(("vision.", "visual_projection."))}
    assert text == {n for n, _ in clip.named_parameters() if n.startswith(("text.", "text_projection."))}
    assert image | text == {n for n, _ in clip.named_parameters()} - {"logit_scale", "logit_bias"}
    assert "text.token_embd.weight" in text and "text.position_embd" in text


def test_linear_probe_trains_the_head_alone(tmp_path):
    """trainer.freeze=[backbone] (the recipe's linear probe): the head is all the optimizer holds."""
    folder = hf_vit_folder(tmp_path / "vit", num_labels=12)
    trainer = vit_trainer(tmp_path, folder, "trainer.freeze=[backbone]", "optim.layer_decay=0.75")
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {n for n, p in trainer.raw_model.named_parameters() if id(p) in held} == {"head.weight", "head.bias"}


# --- ViTs without q/k/v biases ----------------------------------------------------------------------------


def test_vit_without_qkv_bias_from_hf_timm_and_back_through_gguf(tmp_path):
    folder = hf_vit_folder(tmp_path / "vit", qkv_bias=False)
    ref = ViTForImageClassification.from_pretrained(folder).eval()
    pretrained = load_pretrained(folder)
    assert pretrained.model_config["qkv_bias"] is False
    model = imported(folder)
    assert model.blocks[0].attn.qkv.bias is None
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=images).logits
        assert max_diff(model(images), want) <= TOL
    meta = {"metadata": pretrained.metadata}
    out = write_hf_folder(hf_vit.to_hf(model, meta), tmp_path / "hf_out")
    assert json.loads((out / "config.json").read_text())["qkv_bias"] is False
    with torch.no_grad():
        assert max_diff(ViTForImageClassification.from_pretrained(out).eval()(pixel_values=images).logits, want) <= TOL

    # GGUF: clip.cpp loads q/k/v biases as required tensors, so zeros are written and dropped on reading.
    from gguf import GGUFReader

    meta |= {"family": "vit", "model_config": model.config}
    path = export_gguf(model, meta, None, tmp_path / "vit.gguf", "f32")
    biases = {t.name: t.data for t in GGUFReader(path).tensors if t.name.endswith(("attn_q.bias", "attn_v.bias"))}
    assert len(biases) == 4 and all(not b.any() for b in biases.values())
    back = load_pretrained(path)
    assert back.model_config["qkv_bias"] is False
    with torch.no_grad():
        assert max_diff(imported(path)(images), want) <= 1e-3  # the patch conv is stored F16

    # timm: model_args.qkv_bias=false (the folder written from our weights under timm's names)
    ours = perturb(tiny_vit(qkv_bias=False), 2)
    timm = tmp_path / "timm"
    timm.mkdir()
    args = dict(embed_dim=32, depth=2, num_heads=4, img_size=32, qkv_bias=False)
    body = {"architecture": "vit_tiny_patch8_32", "num_classes": 3, "global_pool": "token", "model_args": args}
    (timm / "config.json").write_text(json.dumps(body))
    from safetensors.torch import save_file

    save_file(hf_vit.rename_out(ours.state_dict(), hf_vit.TIMM_RULES), str(timm / "model.safetensors"))
    with torch.no_grad():
        assert max_diff(imported(timm)(images), ours(images)) == 0.0


# --- CLIP: start from an imported CLIP, lock a tower ------------------------------------------------------


def test_lock_image_keeps_the_image_tower_bit_identical_and_out_of_the_optimizer(tmp_path):
    """recipe=clip from a tiny transformers CLIPModel with its tokenizer, model.lock_image=true (LiT): the
    zero-shot baseline is logged at step 0, the image tower does not move, the text tower does."""
    captions = SyntheticPairs("train", 32, 64, 0).captions()
    tok = Tokenizer.train(captions, 300, special_tokens=(EOS, SOT))
    folder = hf_clip_folder(tmp_path / "clip", "gelu", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    tok.save(folder / "tokenizer.json")
    source = imported(folder).state_dict()
    args = ["recipe=clip", f"init_from={folder}", "data.num_train=32", "data.num_val=16", "data.num_zero_shot=16"]
    args += ["trainer.batch_size=8", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.ckpt_every=0"]
    args += ["trainer.progress=false", "trainer.eval_at_start=true", "model.lock_image=true", "optim.warmup_steps=1"]
    cfg = compose_cfg(args)
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, task_class("clip")(cfg, DistInfo()), run_dir, DistInfo())
    trainer.fit()
    raw = trainer.raw_model
    image = {n for n, _ in raw.named_parameters() if n.startswith(("vision.", "visual_projection."))}
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held or p.requires_grad for n, p in raw.named_parameters() if n in image)
    state = raw.state_dict()
    for name in image:
        assert torch.equal(state[name], source[name]), name
    moved = [n for n in state if n.startswith("text.") and not torch.equal(state[n], source[n])]
    assert "text.blocks.0.attn.qkv.weight" in moved and not torch.equal(state["logit_scale"], source["logit_scale"])
    evals = [r for r in read_metrics(run_dir) if "val/zero_shot_top1" in r]
    assert [r["step"] for r in evals] == [0, 3]


def test_clip_at_a_new_image_size(tmp_path):
    """recipe=clip from an imported CLIP with model.image_size=48 (its tower was 32 px): the position embedding
    is resampled (said in one line), the run trains at 48 px; a size off the patch grid is one line."""
    from conftest import run_abi

    captions = SyntheticPairs("train", 32, 64, 0).captions()
    tok = Tokenizer.train(captions, 300, special_tokens=(EOS, SOT))
    folder = hf_clip_folder(tmp_path / "clip", "gelu", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    tok.save(folder / "tokenizer.json")
    args = ["recipe=clip", f"init_from={folder}", "data.num_train=32", "data.num_val=16", "data.num_zero_shot=16"]
    args += ["trainer.batch_size=8", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.progress=false"]
    run = tmp_path / "run"
    r = run_abi([*args, "model.image_size=48", "trainer.ckpt_every=1", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "position embedding resampled: 32 -> 48 px (4x4 -> 6x6 patches" in r.stderr
    meta = json.loads((run / "checkpoints" / "step_00000001" / "meta.json").read_text())
    assert meta["model_config"]["image_size"] == 48
    bad = run_abi([*args, "model.image_size=44", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "model.image_size=44 is not a multiple of the patch size 8" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
