"""GGUF export of the ViT and CLIP families (clip.cpp layout): what gguf.GGUFReader sees, the metadata, rebuilding
models from the file alone, a re-implementation of clip.cpp's graph run on the file's tensors by clip.cpp's
names, end-of-training export and the command line, bad input.

No clip.cpp runtime is installable here, so ``clip_cpp_*`` below follow monatis/clip.cpp's
clip_image_batch_encode / clip_text_encode op by op (which tensor feeds which matmul, class token, pre/post
norms, pooling) to show the names and orientations are the ones that runtime reads."""

from __future__ import annotations

import logging
import math
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_export_cli_refuses, compose_cfg
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize

from abi_train import checkpoint as ckpt
from abi_train import sources
from abi_train.data.pairs import SOT, CaptionEncoder
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.export import export_checkpoint, export_gguf, gguf_clip, gguf_vit
from abi_train.gguf_reader import read_gguf
from abi_train.models import build_model
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

Q = GGMLQuantizationType
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
CLASSES = ["circle", "square", "star", "ring", "cross"]
VIT_META = {"family": "vit", "step": 7, "metadata": {"image_mean": MEAN, "image_std": STD, "class_names": CLASSES}}
CLIP_META = {"family": "clip", "step": 7, "metadata": {"image_mean": MEAN, "image_std": STD}}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """~300 tokens with CLIP's start token, so clip-tiny's 320 embedding rows need padding entries."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(list(pydoc_data.topics.topics.values())[:20], 300, special_tokens=(EOS, SOT)).save(path)
    return path


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norms, biases, head and class token, so a mix-up of any two tensors shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def vit(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(arch="vit", name="vit-t", image_size=32, patch_size=8, width=64, depth=2, heads=4, num_classes=5)
    return _perturb(build_model({**cfg, **over}))


def clip(tok_path: Path, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(arch="clip", name="clip-t", vocab_size=320, eot_id=Tokenizer.load(tok_path).eos_id, embed_dim=64,
               image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4, context_length=32,
               text_width=64, text_layers=2, text_heads=4)  # fmt: skip
    return _perturb(build_model({**cfg, **over}))


def kv_of(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensors_of(reader: GGUFReader) -> dict[str, torch.Tensor]:
    return {
        t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy())
        for t in reader.tensors
    }


def block_names(prefix: str, n: int) -> set[str]:
    parts = ["ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_down", "ffn_up"]
    return {f"{prefix}.blk.{i}.{p}.{k}" for i in range(n) for p in parts for k in ("weight", "bias")}


def expected_names(family: str) -> set[str]:
    vision = {"v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "v.post_ln.weight", "v.post_ln.bias"}
    if family == "vit":  # patch bias, no pre_ln, a head
        return vision | {"v.patch_embd.bias", "v.head.weight", "v.head.bias"} | block_names("v", 2)
    text = {"t.token_embd.weight", "t.position_embd.weight", "t.post_ln.weight", "t.post_ln.bias"}
    return (vision | {"v.pre_ln.weight", "v.pre_ln.bias"} | text | block_names("v", 2) | block_names("t", 2)
            | {"visual_projection.weight", "text_projection.weight"})  # fmt: skip


@pytest.mark.parametrize("family", ["vit", "clip"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_reader_round_trip(tmp_path, tok_path, family, outtype):
    m, meta, fam = (vit(), VIT_META, gguf_vit) if family == "vit" else (clip(tok_path), CLIP_META, gguf_clip)
    reader = GGUFReader(export_gguf(m, meta, tok_path, tmp_path / "m.gguf", outtype))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(family)
    ours = fam.to_gguf(m)
    weight_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    tol = {"f32": 0, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2, "q4_0": 0.15}[outtype]  # per-tensor relative error
    for name, t in tensors.items():
        ref = ours[name].detach().numpy()
        assert tuple(reversed(t.shape.tolist())) == ref.shape, name
        keep_f32 = ref.ndim == 1 or name.endswith("position_embd.weight")
        conv_f16 = name.endswith("patch_embd.weight") and weight_type != Q.F32
        want = Q.F32 if keep_f32 else Q.F16 if conv_f16 else weight_type
        assert t.tensor_type == want, name
        got = dequantize(t.data, t.tensor_type).reshape(ref.shape)
        assert np.linalg.norm(got - ref) <= tol * np.linalg.norm(ref), name
    kv = kv_of(reader)
    assert kv["general.architecture"] == "clip" and kv["abi_train.family"] == family and kv["abi_train.step"] == 7
    assert kv["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[outtype]


def test_layout_shapes_follow_clip_cpp(tmp_path, tok_path):
    """Orientation as clip.cpp's mul_mat reads it: ne[0] (the last PyTorch dim) is each matrix's input size."""
    m = clip(tok_path, mlp_ratio=2.0, embed_dim=32)
    ts = tensors_of(GGUFReader(export_gguf(m, CLIP_META, tok_path, tmp_path / "m.gguf", "f32")))
    assert ts["v.blk.0.ffn_down.weight"].shape == (128, 64)  # fc1 (width -> hidden): clip.cpp's ff_i_w
    assert ts["v.blk.0.ffn_up.weight"].shape == (64, 128)
    assert ts["v.blk.1.attn_q.weight"].shape == ts["t.blk.1.attn_v.weight"].shape == (64, 64)
    assert ts["visual_projection.weight"].shape == ts["text_projection.weight"].shape == (32, 64)
    assert ts["v.class_embd"].shape == (64,) and ts["v.position_embd.weight"].shape == (17, 64)
    assert ts["v.patch_embd.weight"].shape == (64, 3, 8, 8) and ts["t.position_embd.weight"].shape == (32, 64)
    torch.testing.assert_close(ts["v.blk.1.attn_k.weight"], m.vision.blocks[1].attn.qkv.weight[64:128], rtol=0, atol=0)


def test_vit_metadata(tmp_path):
    m = vit(pool="avg", pre_norm=True, patch_bias=False)
    kv = kv_of(GGUFReader(export_gguf(m, VIT_META, None, tmp_path / "m.gguf", "f16")))
    assert kv["general.name"] == "vit-t" and "classifier" in kv["general.description"]
    assert kv["clip.has_text_encoder"] is False and kv["clip.has_vision_encoder"] is True and kv["clip.use_gelu"]
    expect = {"image_size": 32, "patch_size": 8, "embedding_length": 64, "feed_forward_length": 256,
              "block_count": 2, "attention.head_count": 4, "projection_dim": 0}  # fmt: skip
    assert {k: kv[f"clip.vision.{k}"] for k in expect} == expect
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert kv["clip.vision.image_mean"] == pytest.approx(MEAN) and kv["clip.vision.image_std"] == pytest.approx(STD)
    assert kv["abi_train.class_names"] == CLASSES
    assert kv["abi_train.vision.pool"] == "avg" and kv["abi_train.vision.pre_norm"] is True
    assert not any(k.startswith(("clip.text.", "tokenizer.")) for k in kv)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_clip_metadata(tmp_path, tok_path, loss):
    m = clip(tok_path, loss=loss)
    kv = kv_of(GGUFReader(export_gguf(m, CLIP_META, tok_path, tmp_path / "m.gguf", "f16")))
    assert kv["clip.has_text_encoder"] is True and kv["clip.has_vision_encoder"] is True and kv["clip.use_gelu"]
    assert kv["general.description"].startswith("two-tower CLIP")
    for tower in ("text", "vision"):
        expect = {"embedding_length": 64, "feed_forward_length": 256, "block_count": 2, "attention.head_count": 4,
                  "projection_dim": 64}  # fmt: skip
        assert {k: kv[f"clip.{tower}.{k}"] for k in expect} == expect
        assert kv[f"clip.{tower}.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["clip.text.context_length"] == 32 and kv["clip.vision.image_size"] == 32
    assert kv["clip.vision.image_mean"] == pytest.approx(MEAN)
    assert kv["abi_train.logit_scale"] == pytest.approx(m.logit_scale.item())
    assert ("abi_train.logit_bias" in kv) == (loss == "siglip")
    if loss == "siglip":
        assert kv["abi_train.logit_bias"] == pytest.approx(m.logit_bias.item())
    tok = Tokenizer.load(tok_path)
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 320 == len(set(tokens))
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_id == m.config["eot_id"]
    assert types[tok.hf.token_to_id(SOT)] == TokenType.CONTROL and set(types[300:]) == {TokenType.UNUSED}


@pytest.mark.parametrize(
    "over",
    [{}, {"pool": "avg"}, {"pre_norm": True, "patch_bias": False, "norm_eps": 1e-5}, {"width": 48, "mlp_ratio": 2.7},
     {"num_classes": 0}],
)  # fmt: skip
def test_rebuild_vit_from_gguf_alone(tmp_path, over):
    m = vit(**over)
    meta = VIT_META if m.config["num_classes"] else {**VIT_META, "metadata": {"image_mean": MEAN, "image_std": STD}}
    rebuilt, tok, kv = read_gguf(export_gguf(m, meta, None, tmp_path / "m.gguf", "f32"))
    assert tok is None and kv["abi_train.family"] == "vit"
    # mlp_ratio may come back as another float giving the same hidden size (2.7 * 48 -> 129 -> 129 / 48)
    assert {**rebuilt.config, "mlp_ratio": None} == {**m.config, "mlp_ratio": None}
    assert rebuilt.blocks[0].mlp.fc.out_features == m.blocks[0].mlp.fc.out_features
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (rebuilt(x) - m(x)).abs().max().item() < 1e-5
    assert kv.get("abi_train.class_names") == (CLASSES if m.config["num_classes"] else None)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_rebuild_clip_from_gguf_alone(tmp_path, tok_path, loss):
    m = clip(tok_path, loss=loss)
    rebuilt, tok, kv = read_gguf(export_gguf(m, CLIP_META, tok_path, tmp_path / "m.gguf", "f32"))
    assert rebuilt.config == m.config
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(2, 300, (3, 32))
    ids[:, [5, 17, 31]] = m.config["eot_id"]
    with torch.no_grad():
        ours, theirs = m(images, ids), rebuilt(images, ids)
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert (a - b).abs().max().item() < 1e-5
    assert theirs[2].item() == ours[2].item()  # exp(logit_scale): the float32 parameter round-trips exactly
    assert (theirs[3] is None) if loss == "clip" else theirs[3].item() == ours[3].item()
    text = "a photo of a small red circle above a blue star."
    assert tok.encode(text) == Tokenizer.load(tok_path).encode(text) and tok.eos_id == m.config["eot_id"]


# --- clip.cpp's graph, op by op, on the file's tensors by clip.cpp's names ----------------------------------
def _ln(g, x, name, eps):
    return F.layer_norm(x, x.shape[-1:], g[f"{name}.weight"], g[f"{name}.bias"], eps)


def _lin(g, x, name):
    return x @ g[f"{name}.weight"].T + g[f"{name}.bias"]


def _clip_cpp_block(g, x, p, heads, eps, causal):
    """One layer of clip.cpp's encoders: ln1, attn_q/k/v (Q scaled by 1/sqrt(d_head)), attn_out, residual,
    ln2, ff_i_w = ffn_down, GELU, ff_o_w = ffn_up, residual."""
    h = _ln(g, x, f"{p}.ln1", eps)
    n, d = h.shape[0], h.shape[1] // heads
    q, k, v = (_lin(g, h, f"{p}.attn_{w}").view(n, heads, d).transpose(0, 1) for w in "qkv")
    scores = (q / math.sqrt(d)) @ k.transpose(1, 2)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    x = x + _lin(g, (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1), f"{p}.attn_out")
    h = _ln(g, x, f"{p}.ln2", eps)
    return x + _lin(g, F.gelu(_lin(g, h, f"{p}.ffn_down")), f"{p}.ffn_up")


def clip_cpp_image(g, kv, image):
    eps, heads, p = kv["clip.vision.attention.layer_norm_epsilon"], kv["clip.vision.attention.head_count"], 8
    x = F.conv2d(image[None], g["v.patch_embd.weight"], stride=p).flatten(2)[0].T  # (patches, width)
    x = torch.cat([g["v.class_embd"][None], x]) + g["v.position_embd.weight"]
    x = _ln(g, x, "v.pre_ln", eps)
    for i in range(kv["clip.vision.block_count"]):
        x = _clip_cpp_block(g, x, f"v.blk.{i}", heads, eps, causal=False)
    x = _ln(g, x[0], "v.post_ln", eps)  # the class token
    return F.normalize(g["visual_projection.weight"] @ x, dim=0)


def clip_cpp_text(g, kv, ids):
    eps, heads = kv["clip.text.attention.layer_norm_epsilon"], kv["clip.text.attention.head_count"]
    x = g["t.token_embd.weight"][ids] + g["t.position_embd.weight"][: len(ids)]
    for i in range(kv["clip.text.block_count"]):
        x = _clip_cpp_block(g, x, f"t.blk.{i}", heads, eps, causal=True)
    x = _ln(g, x, "t.post_ln", eps)[-1]  # the last token: end-of-text on an unpadded caption
    return F.normalize(g["text_projection.weight"] @ x, dim=0)


def test_clip_cpp_graph_on_the_file_gives_our_embeddings(tmp_path, tok_path):
    m = clip(tok_path, loss="siglip")
    reader = GGUFReader(export_gguf(m, CLIP_META, tok_path, tmp_path / "m.gguf", "f32"))
    g, kv = tensors_of(reader), kv_of(reader)
    tok = Tokenizer.load(tok_path)
    images = torch.randn(2, 3, 32, 32)
    captions = ["a red circle.", "two blue stars"]
    with torch.no_grad():
        ours_img = m.encode_image(images)
        ours_txt = m.encode_text(torch.stack([CaptionEncoder(tok, 32)(c) for c in captions]))  # EOT-padded
        for i, c in enumerate(captions):
            assert (clip_cpp_image(g, kv, images[i]) - ours_img[i]).abs().max() < 1e-5
            ids = torch.tensor([tok.hf.token_to_id(SOT), *tok.encode(c), tok.eos_id])  # unpadded, as clip.cpp
            assert (clip_cpp_text(g, kv, ids) - ours_txt[i]).abs().max() < 1e-5


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_leave_no_file(tmp_path, tok_path):
    out = tmp_path / "m.gguf"
    no_names = {**VIT_META, "metadata": {"image_mean": MEAN, "image_std": STD, "class_names": CLASSES[:3]}}
    other_tok = tmp_path.parent / "other.json"
    Tokenizer.train(["a b c d"] * 4, 300, special_tokens=(SOT, EOS)).save(other_tok)  # EOS gets id 1, not 0
    cases = [
        (clip(tok_path), CLIP_META, None, "clip GGUF export needs a tokenizer.json"),
        (clip(tok_path), CLIP_META, tmp_path / "none.json", "needs a tokenizer.json"),
        (clip(tok_path), CLIP_META, other_tok, "end-of-text id 1 differs from the model's eot_id 0"),
        (clip(tok_path, vocab_size=280, eot_id=0), CLIP_META, tok_path, "the model embeds only 280"),
        (vit(), {**VIT_META, "metadata": {}}, None, "checkpoint metadata needs image_mean with 3 values"),
        (vit(), no_names, None, "needs class_names with 5 entries"),
    ]
    for model, meta, tok, msg in cases:
        with pytest.raises(UserError, match=msg):
            export_gguf(model, meta, tok, out, "f16")
        assert list(tmp_path.iterdir()) == []


def test_reader_refuses_files_it_cannot_rebuild(tmp_path, tok_path):
    path = tmp_path / "x.gguf"

    def write(kv: dict, tensors: dict) -> Path:
        w = GGUFWriter(path, "clip")
        for k, v in kv.items():
            {bool: w.add_bool, int: w.add_uint32, float: w.add_float32}[type(v)](k, v)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    good = kv_of(GGUFReader(export_gguf(vit(), VIT_META, None, tmp_path / "v.gguf", "f32")))
    hp = {k: v for k, v in good.items() if k.startswith("clip.") and isinstance(v, (bool, int, float))}
    conv = {"v.patch_embd.weight": np.zeros((4, 3, 8, 8), np.float32)}
    cases = [  # files of another producer: no abi_train.family, so matched as arch "clip" by gguf_clip
        ({**hp, "clip.has_text_encoder": True, "clip.use_gelu": False}, conv, "quick GELU"),
        (hp, conv, "no text encoder"),
        ({**hp, "clip.has_text_encoder": True}, conv, "lacks the metadata key 'clip.text.embedding_length'"),
    ]
    for kv, tensors, msg in cases:
        with pytest.raises(UserError, match=msg):
            read_gguf(write(kv, tensors))
        path.unlink()


# --- checkpoints, the end of training and the command line -------------------------------------------------
def train(tmp_path: Path, overrides: list[str]) -> Path:
    short = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.ckpt_every=2", "trainer.progress=false"]
    cfg = compose_cfg([*overrides, *short, "trainer.num_workers=0", "export=gguf", "export.outtype=f32"])
    Trainer(cfg, task_class(cfg.task)(cfg, DistInfo()), tmp_path, DistInfo()).fit()
    return tmp_path


def test_training_runs_export_and_the_cli(tmp_path, monkeypatch, capsys):
    vit_run = train(tmp_path / "vit", ["recipe=vit", "data.num_train=32", "data.num_val=16", "trainer.batch_size=8"])
    clip_run = train(tmp_path / "clip", ["recipe=clip", "data.num_train=32", "data.num_val=16",
                                         "data.num_zero_shot=96", "trainer.batch_size=8", "loss=siglip"])  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    original, meta = sources.load_model(vit_run)
    rebuilt, _, kv = read_gguf(vit_run / "model.gguf")
    with torch.no_grad():
        assert (rebuilt(images) - original(images)).abs().max() < 1e-5
    assert kv["abi_train.class_names"] == meta["metadata"]["class_names"] and len(kv["abi_train.class_names"]) == 12
    assert kv["clip.vision.image_mean"] == pytest.approx(meta["metadata"]["image_mean"])

    original, meta = sources.load_model(clip_run)
    rebuilt, tok, kv = read_gguf(clip_run / "model.gguf")
    ids = CaptionEncoder(tok, 32)("a photo of a red circle.")[None]
    with torch.no_grad():
        for a, b in zip(rebuilt(images, ids), original(images, ids), strict=True):
            assert (a - b).abs().max() < 1e-5
    assert kv["tokenizer.ggml.eos_token_id"] == meta["metadata"]["eot_id"]
    assert kv["clip.vision.image_std"] == pytest.approx(meta["metadata"]["image_std"])

    # The real command line once, in a subprocess; then bad input through main() in-process.
    r = subprocess.run([sys.executable, "-m", "abi_train.export", str(clip_run), "-o", str(tmp_path / "c.gguf"),
                        "--outtype", "q8_0"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert kv_of(GGUFReader(tmp_path / "c.gguf"))["general.file_type"] == 7
    clip_ckpt = ckpt.resolve_checkpoint(clip_run)
    assert export_checkpoint(clip_ckpt, tmp_path / "d.gguf", "q4_0").is_file()
    (clip_ckpt / "tokenizer.json").unlink()
    bad = tmp_path / "bad"
    bad.mkdir()
    capsys.readouterr()  # the training runs' output
    cases = [
        ([str(clip_run), "-o", str(bad / "m.gguf")], "clip GGUF export needs a tokenizer.json"),
        ([str(vit_run), "-o", str(bad / "m.gguf"), "--outtype", "q5_k"], "outtype 'q5_k' is not supported"),
        ([str(vit_run), "-o", str(tmp_path / "nodir" / "m.gguf")], "output directory does not exist"),
    ]
    assert_export_cli_refuses(monkeypatch, capsys, cases, bad)


def test_quantized_head_rows_that_do_not_fit_fall_back_to_f16(tmp_path, caplog):
    m = vit(width=48, heads=4)  # rows of 48 are not whole 32-blocks; ffn_up's rows of 192 are
    with caplog.at_level(logging.WARNING):
        reader = GGUFReader(export_gguf(m, VIT_META, None, tmp_path / "m.gguf", "q4_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["v.head.weight"] == types["v.blk.0.ffn_down.weight"] == Q.F16
    assert types["v.blk.0.ffn_up.weight"] == Q.Q4_0 and types["v.patch_embd.weight"] == Q.F16
    assert "v.head.weight" in caplog.text
