"""ViT and CLIP from Hugging Face, timm and open_clip folders, and back to Hugging Face.

The references are transformers' own ViTForImageClassification and CLIPModel, built tiny with random
weights (every parameter perturbed, so a swapped LayerNorm weight/bias or q/k order cannot pass) and saved
with save_pretrained. timm and open_clip do not import beside this torch, so their formats are checked for
self-consistency here (state dicts written in their names from our own weights) and against the libraries
by scripts/check_timm_open_clip.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_abi
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

from abi_train.checkpoint import resolve_checkpoint
from abi_train.data.pairs import SOT
from abi_train.data.synthetic import ShapesDataset
from abi_train.data.synthetic_pairs import SyntheticPairs
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.export import export_hf
from abi_train.hf import clip as hf_clip
from abi_train.hf import vit as hf_vit
from abi_train.hf import write_hf_folder
from abi_train.models import build_model
from abi_train.sources import load_model, load_pretrained
from abi_train.tasks import task_class
from abi_train.trainer import Trainer
from abi_train.weights import load_pretrained_weights

TOL = 1e-4


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def hf_vit_folder(path: Path, num_labels: int = 5, **overrides) -> Path:
    torch.manual_seed(0)
    config = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    ref = perturb(ViTForImageClassification(ViTConfig(**{**config, **overrides})), 1)
    ref.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3}))
    return path


def imported(path: Path) -> torch.nn.Module:
    pretrained = load_pretrained(path)
    model = build_model(pretrained.model_config).eval()
    load_pretrained_weights(model, pretrained)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- ViT ------------------------------------------------------------------------------------------------


def test_hf_vit_imports_and_exports_with_transformers_logits(tmp_path):
    folder = hf_vit_folder(tmp_path / "vit")
    ref = ViTForImageClassification.from_pretrained(folder).eval()
    pretrained = load_pretrained(folder)
    assert pretrained.kind == "hf" and pretrained.model_config["norm_eps"] == 1e-12
    assert pretrained.metadata["class_names"] == [f"class_{i}" for i in range(5)]
    assert pretrained.metadata["image_mean"] == [0.4] * 3
    model = imported(folder)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=images).logits
        assert want.abs().max() > 0.1  # a real signal, not near-zero logits
        assert max_diff(model(images), want) <= TOL

    meta = {"metadata": pretrained.metadata}
    out = write_hf_folder(hf_vit.to_hf(model, meta), tmp_path / "out")
    back = ViTForImageClassification.from_pretrained(out).eval()
    assert back.config.id2label[3] == "class_3" and back.config.label2id["class_3"] == 3
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.4] * 3 and pre["size"] == {"height": 32, "width": 32}
    with torch.no_grad():
        assert max_diff(back(pixel_values=images).logits, want) <= TOL


def test_vit_without_patch_bias_exports_a_zero_bias(tmp_path):
    model = build_model(dict(arch="vit", image_size=16, patch_size=8, width=16, depth=1, heads=2, num_classes=3))
    model = perturb(model, 3)
    model.config["patch_bias"] = False  # same weights minus the conv bias
    model.patch_embd.bias = None
    out = write_hf_folder(hf_vit.to_hf(model, {}), tmp_path / "out")
    back = ViTForImageClassification.from_pretrained(out).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(back(pixel_values=images).logits, model(images)) <= TOL


def timm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our ViT's weights under timm's names, written out by hand (not through the adapter's table)."""
    sd = model.state_dict()
    out = {
        "cls_token": sd["class_embd"].reshape(1, 1, -1),
        "pos_embed": sd["position_embd"][None],
        "patch_embed.proj.weight": sd["patch_embd.weight"],
        "patch_embed.proj.bias": sd["patch_embd.bias"],
        "norm.weight": sd["post_ln.weight"],
        "norm.bias": sd["post_ln.bias"],
        "head.weight": sd["head.weight"],
        "head.bias": sd["head.bias"],
    }
    for i in range(model.config["depth"]):
        for theirs, ours in [("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj")] + [
            ("norm2", "norm2"),
            ("mlp.fc1", "mlp.fc"),
            ("mlp.fc2", "mlp.proj"),
        ]:
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{p}"] = sd[f"blocks.{i}.{ours}.{p}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def timm_folder(path: Path, model: torch.nn.Module, **config) -> Path:
    path.mkdir()
    c = model.config
    model_args = dict(embed_dim=c["width"], depth=c["depth"], num_heads=c["heads"], img_size=c["image_size"])
    body = {
        "architecture": f"vit_tiny_patch{c['patch_size']}_{c['image_size']}",
        "num_classes": c["num_classes"],
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 32, 32]},
        "label_names": [f"n{i}" for i in range(c["num_classes"])],
        **config,
    }
    (path / "config.json").write_text(json.dumps(body))
    save_file(timm_state(model), str(path / "model.safetensors"))
    return path


def test_timm_vit_folder_imports_our_own_weights_exactly(tmp_path):
    ours = perturb(
        build_model(dict(arch="vit", image_size=32, patch_size=8, width=32, depth=2, heads=4, num_classes=4)), 2
    )
    folder = timm_folder(tmp_path / "timm", ours)
    pretrained = load_pretrained(folder)
    assert pretrained.model_config["norm_eps"] == 1e-6 and pretrained.model_config["heads"] == 4
    assert pretrained.metadata["class_names"] == ["n0", "n1", "n2", "n3"]
    assert pretrained.metadata["image_std"] == [0.5] * 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(imported(folder)(images), ours(images)) == 0.0


@pytest.mark.parametrize(
    "config,message",
    [
        ({"model_args": {"reg_tokens": 4}}, "reg_tokens=4"),
        ({"global_pool": "avg"}, "global_pool='avg'"),
        ({"model_args": {"embed_dim": 32, "depth": 2, "num_heads": 4, "class_token": False}}, "class_token=False"),
        ({"model_args": {"embed_dim": 32, "depth": 2, "num_heads": 4, "weird": 1}}, "weird"),
        ({"architecture": "resnet50"}, "timm architecture 'resnet50' is not supported"),
    ],
)
def test_timm_options_our_vit_lacks_are_named(tmp_path, config, message):
    ours = build_model(dict(arch="vit", image_size=32, patch_size=8, width=32, depth=2, heads=4, num_classes=4))
    folder = timm_folder(tmp_path / "timm", ours, **config)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pretrained = load_pretrained(folder)
        pretrained.load_weights()


def test_bad_hf_vit_folders_are_one_clear_error(tmp_path):
    folder = hf_vit_folder(tmp_path / "extra")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(
        {**tensors, "vit.encoder.layer.0.attention.attention.gate.weight": torch.zeros(2)},
        str(folder / "model.safetensors"),
    )
    with pytest.raises(
        UserError, match=r"tensor 'vit\.encoder\.layer\.0\.attention\.attention\.gate\.weight' .*unknown"
    ):
        load_pretrained(folder).load_weights()

    folder = hf_vit_folder(tmp_path / "shape")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["vit.layernorm.weight"] = torch.zeros(31)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"'vit\.layernorm\.weight' has shape \(31,\), the config implies \(32,\)"):
        load_pretrained(folder).load_weights()

    folder = hf_vit_folder(tmp_path / "missing")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["vit.encoder.layer.1.attention.attention.key.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"query\.bias' comes without its k part"):
        load_pretrained(folder).load_weights()


def test_vit_recipe_trains_from_an_hf_folder_and_exports(tmp_path):
    """The CLI end to end: init_from an HF ViT with a 5-class head on the shapes' 12 classes (a fresh head,
    said in one line), 2 steps, GGUF and HF export."""
    folder = hf_vit_folder(tmp_path / "hfvit", num_labels=5)
    run_dir = tmp_path / "run"
    args = [
        "recipe=vit",
        f"init_from={folder}",
        "data.num_train=64",
        "data.num_val=32",
        "trainer.max_steps=2",
        "trainer.batch_size=8",
        "trainer.eval_every=2",
        "trainer.eval_batches=2",
        "trainer.ckpt_every=2",
        "trainer.num_workers=0",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_abi(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "new classifier head: 12 classes (init_from has 5)" in result.stderr.splitlines()
    ckpt = resolve_checkpoint(run_dir)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model_config"]["width"] == 32 and meta["model_config"]["norm_eps"] == 1e-12
    assert meta["metadata"]["image_mean"] == [0.4] * 3  # the source's normalisation, not the data's

    gguf = run_abi([str(run_dir), "-o", str(tmp_path / "x.gguf")], module="abi_train.export")
    assert gguf.returncode == 0, gguf.stderr[-2000:]
    assert (tmp_path / "x.gguf").read_bytes()[:4] == b"GGUF"

    out = export_hf(run_dir, tmp_path / "hf_out")
    model, _ = load_model(ckpt, device="cpu")
    back = ViTForImageClassification.from_pretrained(out).eval()
    assert [back.config.id2label[i] for i in range(12)] == list(ShapesDataset.class_names)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(back(pixel_values=images).logits, model.eval()(images)) <= TOL

    bad = run_abi([*args[:2], "data.image_size=36", f"hydra.run.dir={tmp_path / 'bad'}"])
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "data.image_size=36 is not a multiple of the patch size 8" in last, bad.stderr


# --- CLIP -----------------------------------------------------------------------------------------------

VOCAB = 99
EOS_ID = 5  # not 2: transformers' legacy argmax pooling stays out of the way


def hf_clip_folder(path: Path, act: str, shard: bool = False, **text) -> Path:
    torch.manual_seed(0)
    t = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=act,
        eos_token_id=EOS_ID,
        bos_token_id=4,
        pad_token_id=EOS_ID,
    )
    t |= text
    v = dict(
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )
    ref = perturb(CLIPModel(CLIPConfig(text_config=t, vision_config=v, projection_dim=24)), 4)
    ref.save_pretrained(path, max_shard_size="60KB" if shard else "5GB")
    return path


def clip_inputs(eos: int = EOS_ID) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(6, VOCAB - 1, (3, 16), generator=gen)
    ids[:, 0] = 4
    ids[0, 7:] = eos  # padded with end-of-text
    ids[1, 3] = eos  # tokens after it
    ids[2, -1] = eos  # full length
    return images, ids


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def check_clip(model: torch.nn.Module, ref: CLIPModel, images: torch.Tensor, ids: torch.Tensor) -> None:
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=images)
        img, txt, scale, bias = model(images, ids)
    assert bias is None
    assert max_diff(img, unit(want.image_embeds)) <= TOL
    assert max_diff(txt, unit(want.text_embeds)) <= TOL
    assert abs(scale.item() - ref.logit_scale.exp().item()) <= TOL
    assert max_diff(scale * img @ txt.T, want.logits_per_image) <= TOL * 100  # logits are ~scale x embeddings


@pytest.mark.parametrize("act,shard", [("quick_gelu", False), ("gelu", True)])
def test_hf_clip_imports_and_exports_with_transformers_embeddings(tmp_path, act, shard):
    folder = hf_clip_folder(tmp_path / "clip", act, shard)
    assert shard == (folder / "model.safetensors.index.json").is_file()
    ref = CLIPModel.from_pretrained(folder).eval()
    pretrained = load_pretrained(folder)
    c = pretrained.model_config
    assert (c["act"], c["eot_id"], c["vocab_size"], c["context_length"], c["embed_dim"]) == (act, EOS_ID, VOCAB, 16, 24)
    assert pretrained.metadata["eot_id"] == EOS_ID and pretrained.tokenizer is None
    model = imported(folder)
    images, ids = clip_inputs()
    check_clip(model, ref, images, ids)

    out = write_hf_folder(hf_clip.to_hf(model, {"metadata": pretrained.metadata}), tmp_path / "out")
    back = CLIPModel.from_pretrained(out).eval()
    assert back.config.text_config.eos_token_id == EOS_ID
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {"height": 32, "width": 32}
    check_clip(model, back, images, ids)


def test_legacy_eos_token_id_pools_at_the_highest_id(tmp_path):
    """eos_token_id == 2: transformers pools at argmax(ids); the import puts eot_id at the last id."""
    folder = hf_clip_folder(tmp_path / "clip", "quick_gelu", eos_token_id=2, pad_token_id=2)
    pretrained = load_pretrained(folder)
    assert pretrained.model_config["eot_id"] == VOCAB - 1
    images, ids = clip_inputs(eos=VOCAB - 1)
    check_clip(imported(folder), CLIPModel.from_pretrained(folder).eval(), images, ids)


def test_clip_towers_that_differ_are_named(tmp_path):
    folder = hf_clip_folder(tmp_path / "clip", "gelu")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"towers differ in layer_norm_eps \(text 1e-05, vision 1e-06\)"):
        load_pretrained(folder)


def open_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our CLIP's weights under open_clip's names, written out by hand."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["vision.patch_embd.weight"],
        "visual.class_embedding": sd["vision.class_embd"],
        "visual.positional_embedding": sd["vision.position_embd"],
        "visual.ln_pre.weight": sd["vision.pre_ln.weight"],
        "visual.ln_pre.bias": sd["vision.pre_ln.bias"],
        "visual.ln_post.weight": sd["vision.post_ln.weight"],
        "visual.ln_post.bias": sd["vision.post_ln.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
        "token_embedding.weight": sd["text.token_embd.weight"],
        "positional_embedding": sd["text.position_embd"],
        "ln_final.weight": sd["text.post_ln.weight"],
        "ln_final.bias": sd["text.post_ln.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    names = {
        "norm1": "ln_1",
        "attn.proj": "attn.out_proj",
        "norm2": "ln_2",
        "mlp.fc": "mlp.c_fc",
        "mlp.proj": "mlp.c_proj",
    }
    for ours, theirs in (("vision.", "visual.transformer."), ("text.", "transformer.")):
        for i in range(2):
            o, t = f"{ours}blocks.{i}.", f"{theirs}resblocks.{i}."
            out[f"{t}attn.in_proj_weight"] = sd[f"{o}attn.qkv.weight"]
            out[f"{t}attn.in_proj_bias"] = sd[f"{o}attn.qkv.bias"]
            for a, b in names.items():
                for p in ("weight", "bias"):
                    out[f"{t}{b}.{p}"] = sd[f"{o}{a}.{p}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def test_open_clip_folder_imports_our_own_weights_exactly(tmp_path):
    config = dict(
        arch="clip", vocab_size=VOCAB, eot_id=VOCAB - 1, embed_dim=24, image_size=32, patch_size=8,
        vision_width=64, vision_layers=2, vision_heads=2, context_length=16, text_width=32, text_layers=2,
        text_heads=4, act="quick_gelu",
    )  # fmt: skip
    ours = perturb(build_model(config), 5)
    folder = tmp_path / "oc"
    folder.mkdir()
    model_cfg = {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2},
    }
    preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    save_file(open_clip_state(ours), str(folder / "open_clip_model.safetensors"))
    pretrained = load_pretrained(folder)
    assert pretrained.model_config == {**config, "name": "oc", "mlp_ratio": 4.0, "norm_eps": 1e-5, "loss": "clip"}
    assert pretrained.metadata["image_mean"] == [0.1, 0.2, 0.3]
    images, ids = clip_inputs(eos=VOCAB - 1)
    with torch.no_grad():
        got, want = imported(folder)(images, ids), ours(images, ids)
    assert all(max_diff(a, b) == 0.0 for a, b in zip(got[:3], want[:3], strict=True))

    model_cfg["text_cfg"]["embed_cls"] = True
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    with pytest.raises(UserError, match=r"open_clip option text_cfg\.embed_cls=True is not supported"):
        load_pretrained(folder)


def test_clip_recipe_starts_from_an_hf_clip_with_its_tokenizer(tmp_path):
    """The task takes image size, context, vocabulary, end-of-text and tokenizer from the source."""
    captions = SyntheticPairs("train", 32, 64, 0).captions()
    tok = Tokenizer.train(captions, 300, special_tokens=(EOS, SOT))
    folder = hf_clip_folder(tmp_path / "clip", "quick_gelu", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    tok.save(folder / "tokenizer.json")
    base = ["recipe=clip", "data.num_train=32", "data.num_val=16", "data.num_zero_shot=16", "trainer.batch_size=8"]
    base += ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1", "trainer.progress=false"]
    cfg = compose_cfg([*base, f"init_from={folder}"])
    run_dir = tmp_path / "run"
    Trainer(cfg, task_class("clip")(cfg, DistInfo()), run_dir, DistInfo()).fit()
    meta = json.loads((resolve_checkpoint(run_dir) / "meta.json").read_text())
    assert meta["model_config"]["vision_width"] == 48 and meta["model_config"]["eot_id"] == tok.eos_id
    assert meta["metadata"]["context_length"] == 16
    assert Tokenizer.load(run_dir / "tokenizer.json").fingerprint == tok.fingerprint

    with pytest.raises(UserError, match="loss=siglip but init_from=.* is a clip-loss CLIP"):
        cfg = compose_cfg([*base, f"init_from={folder}", "loss=siglip"])
        Trainer(cfg, task_class("clip")(cfg, DistInfo()), tmp_path / "bad", DistInfo()).fit()
    vit_folder = hf_vit_folder(tmp_path / "vit")
    with pytest.raises(UserError, match="holds a 'vit' model but this run trains 'clip' models"):
        cfg = compose_cfg([*base, f"init_from={vit_folder}"])
        Trainer(cfg, task_class("clip")(cfg, DistInfo()), tmp_path / "bad3", DistInfo()).fit()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="brings no tokenizer"):
        cfg = compose_cfg([*base, f"init_from={folder}"])
        Trainer(cfg, task_class("clip")(cfg, DistInfo()), tmp_path / "bad2", DistInfo()).fit()


def test_siglip_clip_refuses_hf_export():
    model = build_model(dict(arch="clip", vocab_size=50, eot_id=3, embed_dim=8, image_size=16, patch_size=8,
                             vision_width=16, vision_layers=1, vision_heads=2, context_length=8, text_width=16,
                             text_layers=1, text_heads=2, loss="siglip"))  # fmt: skip
    with pytest.raises(UserError, match="SigLIP-trained CLIP"):
        hf_clip.to_hf(model, {})
