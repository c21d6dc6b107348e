"""The ViT task on the shared trainer: batches, loss options, evaluation tags, corrupt images, exact
resume, and a tiny ViT learning the generated shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, losses, read_metrics
from PIL import Image

from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.tasks.vit import ViTTask
from abi_train.trainer import Trainer

# vit-tiny on 32 px shapes, small batches, a short run.
TINY_VIT = [
    "recipe=vit",
    "trainer.batch_size=16",
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "trainer.ckpt_every=0",
    "trainer.num_workers=1",  # a worker process: in the main one, 2 intra-op threads slow tiny image ops
    "trainer.progress=false",
    "optim.warmup_steps=2",
]
SMALL_SHAPES = ["data.num_train=512", "data.num_val=64"]


def make_task(overrides: list[str] = (), data: list[str] = SMALL_SHAPES) -> ViTTask:
    task = ViTTask(compose_cfg([*TINY_VIT, *data, *overrides]), DistInfo())
    task.setup(None)
    return task


def first_batches(task: ViTTask, n: int, start_step: int = 0) -> list[dict]:
    sampler = GlobalBatchSampler(task.num_train_items(), 16, seed=1337, start_step=start_step)
    batches = iter(task.train_loader(sampler))
    return [next(batches) for _ in range(n)]


def test_setup_batches_loss_and_metadata():
    task = make_task()
    config = task.model_config()
    assert config["arch"] == "vit" and config["num_classes"] == 12 and config["image_size"] == 32
    model = build_model(config)
    batch = first_batches(task, 1)[0]
    assert batch["images"].shape == (16, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["labels"].shape == (16,) and batch["skipped"] == 0
    assert task.items_in(batch) == 16
    loss, logs = task.loss(model, batch)
    assert loss.item() == pytest.approx(np.log(12), rel=1e-4)  # zero head: uniform logits
    assert set(logs) == {"train/top1"} and not logs["train/top1"].requires_grad
    meta = task.metadata()
    assert len(meta["class_names"]) == 12 and meta["image_size"] == 32
    assert meta["image_mean"] == [0.24, 0.23, 0.23] and meta["image_std"] == [0.2] * 3


def test_train_batches_are_deterministic_and_resumable():
    """The batch of step k is the same from a fresh loader and from one started at step k (resume);
    epochs differ in their augmentation."""
    task = make_task()
    fresh = first_batches(task, 3)
    again = first_batches(make_task(), 3)
    resumed = first_batches(task, 1, start_step=2)[0]
    for a, b in zip(fresh, again, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(fresh[2]["images"], resumed["images"])
    item = task.train_set[(5, 0)][0]
    assert torch.equal(item, task.train_set[(5, 0)][0])
    assert not torch.equal(item, task.train_set[(5, 512)][0])  # item 5 drawn again in the next epoch


@pytest.mark.parametrize("option", ["data.augment.mixup=0.8", "data.augment.cutmix=1.0"])
def test_mixup_and_cutmix_give_soft_targets(option):
    task = make_task([option, "data.augment.label_smoothing=0.1"])
    batch = first_batches(task, 1)[0]
    assert batch["targets"].shape == (16, 12)
    torch.testing.assert_close(batch["targets"].sum(-1), torch.ones(16))
    assert batch["targets"].min() >= 0.1 / 12 - 1e-6  # smoothing folded in
    model, seen = build_model(task.model_config()), []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    loss, logs = task.loss(model, batch)
    assert loss.item() > 0 and logs == {}
    # The images are mixed where the model is, after normalisation: the batch itself stays uint8.
    assert batch["images"].dtype == torch.uint8
    torch.testing.assert_close(seen[0], batch["mix"].images(task.normalize(batch["images"])))
    assert not torch.equal(seen[0], task.normalize(batch["images"]))


def test_label_smoothing_raises_the_loss_of_confident_logits():
    plain, smooth = make_task(), make_task(["data.augment.label_smoothing=0.2"])
    model = build_model(plain.model_config())
    torch.nn.init.normal_(model.head.weight, std=1.0)
    batch = first_batches(plain, 1)[0]
    assert smooth.loss(model, batch)[0] != plain.loss(model, batch)[0]


def test_evaluate_tags_grid_and_rng():
    task = make_task()
    model = build_model(task.model_config()).eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        result = task.evaluate(model, torch.device("cpu"))
        again = task.evaluate(model, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    assert result.scalars == again.scalars
    assert set(result.scalars) == {"val/loss", "val/top1", "val/top5", "data/skipped_images"}
    for tag in ("val/top1", "val/top5"):
        assert 0.0 <= result.scalars[tag] <= 1.0
    assert result.scalars["val/top5"] >= result.scalars["val/top1"]
    grid = result.images["val/predictions"]
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3


def test_image_folder_with_a_corrupt_file_counts_it(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        for i in range(6):  # mixed sizes and modes (RGB, grayscale, RGBA): all become 32x32 RGB
            image = Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))
            image.convert(("RGB", "L", "RGBA")[i % 3]).save(tmp_path / name / f"{i}.png")
    (tmp_path / "b" / "zz_broken.jpg").write_bytes(b"broken")
    images = ["data=images", f"data.path={tmp_path}", "data.val_fraction=0.2"]
    task = make_task(["trainer.batch_size=19"], data=images)
    assert task.class_names == ["a", "b", "c"]
    model = build_model(task.model_config())
    sampler = GlobalBatchSampler(task.num_train_items(), task.num_train_items(), seed=0)
    batch = next(iter(task.train_loader(sampler)))
    task.loss(model, batch)
    with torch.no_grad():
        result = task.evaluate(model.eval(), torch.device("cpu"))
    skipped = result.scalars["data/skipped_images"] + result.scalars.get("data/skipped_val_images", 0)
    assert skipped == 1
    empty = {"images": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "skipped": 3}
    loss, _ = task.loss(model, empty)  # a batch of only unreadable images: zero loss, no crash
    assert loss.item() == 0.0 and task.skipped >= 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.num_classes=10"], "model.num_classes=10 but the data has 12 classes"),
        (["model.patch_size=5"], "model.image_size=32 is not divisible by model.patch_size=5"),
        (["model=tiny"], "task vit needs a ViT model"),
    ],
)
def test_bad_inputs(overrides, message):
    with pytest.raises(UserError, match=message):
        task = make_task(overrides)
        build_model(task.model_config())


@pytest.mark.parametrize(
    "data,message", [(["data=images"], "data.path is not set"), (["data=text"], "data=text is not an image dataset")]
)
def test_bad_data(data, message):
    with pytest.raises(UserError, match=message):
        make_task(data=data)


def run(tmp_path: Path, overrides: list[str], name: str = "run", resume: bool = False) -> Path:
    cfg = compose_cfg([*TINY_VIT, *SMALL_SHAPES, *overrides, f"resume={str(resume).lower()}"])
    Trainer(cfg, ViTTask(cfg, DistInfo()), tmp_path / name, DistInfo()).fit()
    return tmp_path / name


def test_exact_resume(tmp_path):
    """6 steps in one run == 3 steps + resume for 3 more (with augmentation and mixup on)."""
    opts = ["trainer.max_steps=6", "trainer.ckpt_every=3", "data.augment.mixup=0.5", "data.augment.cutmix=1.0"]
    full = run(tmp_path, opts, "full")
    part = run(tmp_path, [*opts, "trainer.stop_at_step=3"], "part")
    run(tmp_path, opts, "part", resume=True)
    assert losses(full) == losses(part) and sorted(losses(part)) == list(range(1, 7))


def test_tiny_vit_learns_the_shapes_above_chance(tmp_path):
    """200 steps on the shared trainer: val top-1 far above chance. Chance is 1/12 = 0.083 with a
    standard deviation of 0.012 on 512 images, so 0.15 is over 5 deviations above it."""
    opts = [
        "data.num_train=12800",
        "data.num_val=512",
        "trainer.batch_size=64",
        "trainer.max_steps=200",
        "trainer.eval_every=200",
        "trainer.eval_batches=8",
        "trainer.log_every=50",
        "optim.lr=3e-3",
        "optim.warmup_steps=20",
    ]
    rows = read_metrics(run(tmp_path, opts))
    top1 = [r["val/top1"] for r in rows if "val/top1" in r][-1]
    assert top1 > 0.15
