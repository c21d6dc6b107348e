"""The CLIP task: caption data (generated, CSV, JSON lines, datasets), tokenization, evaluation tags,
learning above chance, SigLIP, resume equality and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, losses, read_metrics
from omegaconf import OmegaConf
from PIL import Image

from abi_train.data.pairs import CaptionEncoder, PairDataset, collate_pairs, load_pairs
from abi_train.data.synthetic_pairs import CLASS_NAMES, HELD_OUT, SyntheticPairs, SyntheticZeroShot
from abi_train.data.tokenizer import Tokenizer
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

TINY_CLIP = [
    "recipe=clip",
    "trainer.batch_size=16",
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
    "optim.warmup_steps=2",
]
SMALL_CAPTIONS = ["data.num_train=256", "data.num_val=32", "data.num_zero_shot=96"]
TAGS = [
    "val/zero_shot_top1", "val/zero_shot_top5", "val/zero_shot_top1_held_out",
    *(f"val/{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
]  # fmt: skip


def make_task(overrides: list[str]):
    data = [] if any(o.startswith("data=") for o in overrides) else SMALL_CAPTIONS
    cfg = compose_cfg([*TINY_CLIP, *data, *overrides])
    task = task_class(cfg.task)(cfg, DistInfo())
    task.setup(None)
    return task


def train(tmp_path: Path, overrides: list[str], name: str = "run") -> Path:
    """A Trainer run; ``overrides`` come after TINY_CLIP (and replace the small captions set when they pick data)."""
    data = [] if any(o.startswith("data=") for o in overrides) else SMALL_CAPTIONS
    cfg = compose_cfg([*TINY_CLIP, *data, *overrides])
    run_dir = tmp_path / name
    Trainer(cfg, task_class("clip")(cfg, DistInfo()), run_dir, DistInfo()).fit()
    return run_dir


# --- generated data -----------------------------------------------------------------------------
def test_synthetic_pairs_are_deterministic_and_hold_out_combinations():
    train = SyntheticPairs("train", 32, 400, seed=3)
    image, caption = train[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(SyntheticPairs("train", 32, 400, seed=3)[7][0], image)
    assert train.caption(7) == caption
    assert SyntheticPairs("val", 32, 400, seed=3).caption(7) != caption or not torch.equal(
        SyntheticPairs("val", 32, 400, seed=3)[7][0], image
    )
    captions = train.captions()
    assert not any(f"{c} {s}" in text for text in captions for c, s in HELD_OUT)
    val = SyntheticPairs("val", 32, 400, seed=3).captions()
    assert any(f"{c} {s}" in text for text in val for c, s in HELD_OUT)
    zero_shot = SyntheticZeroShot(32, 2 * len(CLASS_NAMES))
    assert [zero_shot[i][1] for i in range(len(zero_shot))] == list(range(len(CLASS_NAMES))) * 2
    assert len(SyntheticZeroShot.held_out_classes) == len(HELD_OUT)


def test_caption_encoder_pads_and_truncates_with_eot():
    tok = Tokenizer.train(
        ["a red circle above a blue star."] * 10, 300, special_tokens=("<|endoftext|>", "<|startoftext|>")
    )
    enc = CaptionEncoder(tok, 8)
    short = enc("a red circle.")
    assert short.shape == (8,) and short[0] == enc.sot_id
    n = 1 + len(tok.encode("a red circle."))
    assert short[n:].tolist() == [enc.eot_id] * (8 - n)
    long = enc("a red circle above a blue star. " * 5)
    assert long[-1] == enc.eot_id and (long == enc.eot_id).sum() == 1
    assert tok.decode(short[1:n].tolist()) == "a red circle."


# --- real data files ----------------------------------------------------------------------------
def write_pairs(root: Path) -> list[tuple[str, str]]:
    """Six images (RGB, grayscale, RGBA) and one corrupt file; rows (relative path, caption)."""
    (root / "img").mkdir(parents=True)
    rows = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "RGB", "RGB", "RGB"]):
        Image.new(mode, (40 + i, 30), color=(40 * i,) * len(mode)).save(root / "img" / f"{i}.png")
        rows.append((f"img/{i}.png", f"caption number {i}"))
    (root / "img" / "bad.png").write_bytes(b"not a png at all")
    rows.insert(2, ("img/bad.png", "a broken image"))
    return rows


def pairs_cfg(where: Path, **extra):
    base = OmegaConf.load(Path(__file__).parents[1] / "configs" / "data" / "pairs.yaml")
    return OmegaConf.merge(base, {"path": str(where), "val_size": 2, **extra})


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_pairs_skip_a_corrupt_image(tmp_path, fmt):
    rows = write_pairs(tmp_path)
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        path.write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        path.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    train, val, zero_shot = load_pairs(pairs_cfg(path))
    assert zero_shot is None and len(train) + len(val) == len(rows) and len(val) == 2
    everything = load_pairs(pairs_cfg(path, val_path=str(path)))[0]
    assert everything.captions() == [c for _, c in rows]
    assert everything[2] is None  # the corrupt file
    tok = Tokenizer.train(everything.captions(), 300)
    dataset = PairDataset(everything, lambda im: im.float()[:, :30, :30], CaptionEncoder(tok, 16))
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate_pairs(items)
    assert batch["images"].shape == (len(rows), 3, 30, 30) and batch["tokens"].shape == (len(rows), 16)
    assert batch["skipped"] == 1  # replaced by the next readable pair, so the batch keeps its size
    assert items[2]["caption"] == "caption number 2"


def test_datasets_folder_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (24, 24), (i * 50, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"img": images, "text": [f"red {i}" for i in range(4)]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    train, val, _ = load_pairs(pairs_cfg(tmp_path / "saved", image_field="img", text_field="text", val_size=1))
    assert len(train) == 3 and len(val) == 1
    image, caption = train[0]
    assert image.shape == (3, 24, 24) and caption.startswith("red")


def test_bad_pairs_input_is_one_clear_error(tmp_path):
    rows = write_pairs(tmp_path)
    path = tmp_path / "pairs.csv"
    path.write_text("image,text\n" + "".join(f"{p},{c}\n" for p, c in rows))
    with pytest.raises(UserError, match=r"data.text_field='caption'.*columns: image, text"):
        load_pairs(pairs_cfg(path))
    with pytest.raises(UserError, match="does not exist"):
        load_pairs(pairs_cfg(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match="data.path"):
        load_pairs(pairs_cfg(path, path=None))
    with pytest.raises(UserError, match="val_size"):
        load_pairs(pairs_cfg(path, text_field="text", val_size=100))


def test_pairs_recipe_trains_and_zero_shots_from_a_folder(tmp_path):
    rows = write_pairs(tmp_path)
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c in rows * 3))
    for name in ("cat", "dog"):
        (tmp_path / "zs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "zs" / name / "0.png")
    run = train(
        tmp_path,
        ["data=pairs", f"data.path={path}", f"data.zero_shot_path={tmp_path / 'zs'}", "data.val_size=4",
         "data.vocab_size=300", "trainer.batch_size=4", "trainer.max_steps=5", "trainer.eval_every=5"],  # an epoch
    )  # fmt: skip
    rows = read_metrics(run)
    last = rows[-1]
    assert "val/zero_shot_top1" in last and "val/i2t_r@1" in last
    assert last["data/skipped_images"] >= 1
    meta_tokenizer = Tokenizer.load(run / "tokenizer.json")
    assert meta_tokenizer.hf.token_to_id("<|startoftext|>") is not None


# --- the task -----------------------------------------------------------------------------------
def test_evaluate_returns_every_tag_as_a_fraction():
    task = make_task([])
    model = build_model(task.model_config()).eval()
    result = task.evaluate(model, torch.device("cpu"))
    for tag in TAGS:
        assert 0.0 <= result.scalars[tag] <= 1.0, tag
    assert result.scalars["val/loss"] > 0
    image = result.images["val/similarity"]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert result.texts["val/similarity_captions"].startswith("0: ")
    meta = task.metadata()
    assert meta["class_names"] == CLASS_NAMES and meta["eot_id"] == task.model_config()["eot_id"]
    assert len(meta["image_mean"]) == 3 and meta["context_length"] == 32


def test_model_config_is_filled_from_the_tokenizer():
    task = make_task(["loss=siglip"])
    config = task.model_config()
    assert config["vocab_size"] == task.tokenizer.vocab_size and config["loss"] == "siglip"
    assert config["eot_id"] == task.tokenizer.eos_id
    assert task.supports_accumulation is False


def test_bad_task_config_is_one_clear_error():
    with pytest.raises(UserError, match="loss='triplet'"):
        make_task(["loss=triplet"])
    with pytest.raises(UserError, match="data=text is not caption data"):
        make_task(["data=text"])
    with pytest.raises(UserError, match="accumulation"):
        cfg = compose_cfg([*TINY_CLIP, *SMALL_CAPTIONS, "trainer.global_batch_size=32"])
        Trainer(cfg, task_class("clip")(cfg, DistInfo()), Path("unused"), DistInfo())


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiny_clip_learns_the_pairs_above_chance(tmp_path, loss):
    run = train(
        tmp_path,
        [f"loss={loss}", "data.num_train=4096", "data.num_val=64", "trainer.batch_size=64", "trainer.max_steps=100",
         "trainer.eval_every=100", "trainer.log_every=20", "optim.warmup_steps=10"],
    )  # fmt: skip
    rows = read_metrics(run)
    last = rows[-1]
    assert last["val/i2t_r@5"] > 3 * 5 / 64 and last["val/t2i_r@5"] > 3 * 5 / 64  # chance: 5 of 64
    assert last["val/zero_shot_top5"] > 2 * 5 / len(CLASS_NAMES)
    assert all(r["train/logit_scale"] <= 100.0 + 1e-3 for r in rows if "train/logit_scale" in r)


def test_exact_resume(tmp_path):
    full = train(tmp_path, ["trainer.max_steps=6"], "full")
    part = train(tmp_path, ["trainer.max_steps=6", "trainer.stop_at_step=3", "trainer.ckpt_every=3"], "part")
    cfg = compose_cfg([*TINY_CLIP, *SMALL_CAPTIONS, "trainer.max_steps=6", "resume=true", "trainer.ckpt_every=3"])
    Trainer(cfg, task_class("clip")(cfg, DistInfo()), part, DistInfo()).fit()
    assert losses(full) == losses(part)
    assert sorted(losses(part)) == list(range(1, 7))
