"""Image decoding, the image-folder and `datasets` loaders, corrupt-image skipping, augmentation
determinism, and the generated shapes."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from abi_train.data.augment import (
    EvalTransform,
    Normalize,
    TrainTransform,
    draw_mix,
    random_resized_crop,
    resize_center_crop,
)
from abi_train.data.images import collate_images, load_image, open_image_data, split_off
from abi_train.data.synthetic import COLORS, SHAPES, ShapesDataset, draw_shape, random_background
from abi_train.errors import UserError


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def odd_images(rng: np.random.Generator) -> dict[str, Image.Image]:
    """One image per awkward mode: all must come back as RGB."""
    gray = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    return {
        "rgb.png": Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)),
        "gray.png": Image.fromarray(gray),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8)),
        "palette.gif": Image.fromarray(gray).convert("P"),
        "gray16.png": Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16)),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert("CMYK"),
    }


def write_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for fname, image in odd_images(rng).items():
            image.save(root / name / fname)
    if corrupt:
        (root / classes[-1] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def hf_rows(n: int, labels: list, corrupt_at: int | None = None) -> datasets.Dataset:
    rng = np.random.default_rng(1)
    images = [
        {"bytes": png_bytes(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))), "path": None}
        for _ in range(n)
    ]
    if corrupt_at is not None:
        images[corrupt_at] = {"bytes": b"garbage", "path": None}
    features = datasets.Features(
        {"img": datasets.Image(), "lbl": datasets.Value("string"), "extra": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"img": images, "lbl": labels, "extra": list(range(n))}, features=features)


# --- decoding --------------------------------------------------------------------------------
def test_load_image_converts_every_mode_to_rgb(tmp_path):
    for name, image in odd_images(np.random.default_rng(0)).items():
        path = tmp_path / name
        image.save(path)
        for source in (path, str(path), path.read_bytes(), {"bytes": None, "path": str(path)}):
            out = load_image(source)
            assert out is not None and out.mode == "RGB" and out.size == (12, 10), name
    wide = load_image(tmp_path / "gray16.png")
    assert np.asarray(wide).max() > 128  # 16-bit values are rescaled, not clipped to white


def test_load_image_returns_none_for_unreadable(tmp_path):
    good = png_bytes(Image.new("RGB", (20, 20), (255, 0, 0)))
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    assert load_image(tmp_path / "truncated.png") is None
    assert load_image(b"definitely not an image") is None
    assert load_image(tmp_path / "missing.png") is None


# --- loaders ---------------------------------------------------------------------------------
def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    data = open_image_data(write_folder(tmp_path / "pets"))
    assert data.class_names == ["cat", "dog"] and data.val is None
    items = [data.train[i] for i in range(len(data.train))]
    assert len(items) == 13 and sum(x is None for x in items) == 1
    assert all(x[0].dtype == torch.uint8 and x[0].shape == (3, 10, 12) for x in items if x is not None)
    batch = collate_images(items)
    assert batch["images"].shape == (12, 3, 10, 12) and batch["skipped"] == 1
    assert batch["labels"].tolist() == [0] * 6 + [1] * 6
    # Through DataLoader workers too: the count travels in the batch, not in a shared counter.
    loader = torch.utils.data.DataLoader(data.train, batch_size=5, num_workers=2, collate_fn=collate_images)
    assert sum(b["skipped"] for b in loader) == 1


def test_image_folder_with_split_folders(tmp_path):
    write_folder(tmp_path / "ds" / "train", ("a", "b", "c"), corrupt=False)
    write_folder(tmp_path / "ds" / "val", ("b",), corrupt=False)
    data = open_image_data(tmp_path / "ds")
    assert data.class_names == ["a", "b", "c"]
    assert {data.val[i][1] for i in range(len(data.val))} == {1}  # "b" keeps its training id
    write_folder(tmp_path / "other", ("zebra",), corrupt=False)
    with pytest.raises(UserError, match="zebra"):
        open_image_data(tmp_path / "ds", val_path=tmp_path / "other")


def test_parquet_with_string_labels(tmp_path):
    hf_rows(6, ["b", "a", "b", "c", "a", "a"], corrupt_at=2).to_parquet(tmp_path / "x.parquet")
    data = open_image_data(tmp_path / "x.parquet", "img", "lbl")
    assert data.class_names == ["a", "b", "c"] and len(data.train) == 6
    assert [None if x is None else x[1] for x in (data.train[i] for i in range(6))] == [1, 0, None, 2, 0, 0]
    train, val = split_off(data.train, 0.34, seed=0)
    assert len(train) == 4 and len(val) == 2 and not set(train.indices) & set(val.indices)


def test_save_to_disk_dataset_dict_with_class_labels(tmp_path):
    ds = hf_rows(6, ["x", "y", "x", "y", "z", "x"]).cast_column("lbl", datasets.ClassLabel(names=["x", "y", "z"]))
    datasets.DatasetDict({"train": ds, "test": ds.select([1, 4])}).save_to_disk(tmp_path / "saved")
    data = open_image_data(tmp_path / "saved", "img", "lbl")
    assert data.class_names == ["x", "y", "z"] and len(data.train) == 6
    assert [data.val[i][1] for i in range(2)] == [1, 2]
    ds.save_to_disk(tmp_path / "single")  # a plain Dataset: no val split
    assert open_image_data(tmp_path / "single", "img", "lbl").val is None


def test_parquet_folder_in_hub_layout(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    hf_rows(4, ["a", "b", "a", "b"]).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    hf_rows(2, ["b", "a"]).to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    data = open_image_data(tmp_path / "hub", "img", "lbl")
    assert len(data.train) == 4 and len(data.val) == 2 and data.class_names == ["a", "b"]


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    hf_rows(3, ["a", "b", "a"]).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"data.label_field='label' is not a column .*columns: img, lbl, extra"):
        open_image_data(tmp_path / "x.parquet", "img", "label")
    with pytest.raises(UserError, match="data.image_field='image'"):
        open_image_data(tmp_path / "x.parquet", "image", "lbl")
    with pytest.raises(UserError, match="does not exist"):
        open_image_data(tmp_path / "nowhere")
    with pytest.raises(UserError, match="data.path is not set"):
        open_image_data(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="could not be read as images"):
        open_image_data(tmp_path / "empty")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="could not be read as images"):
        open_image_data(tmp_path / "broken.parquet", "img", "lbl")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "bad" / "cls" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of its 3 images could be read"):
        open_image_data(tmp_path / "bad")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        open_image_data(tmp_path / "noimg")
    with pytest.raises(UserError, match="val_fraction"):
        split_off(open_image_data(tmp_path / "x.parquet", "img", "lbl").train, 0.0)


# --- augmentation ----------------------------------------------------------------------------
def test_train_transform_is_deterministic_per_generator():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    t = TrainTransform(24, scale=(0.2, 1.0))
    a = t(img, torch.Generator().manual_seed(7))
    b = t(img, torch.Generator().manual_seed(7))
    c = t(img, torch.Generator().manual_seed(8))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crops_and_eval_transform():
    img = torch.arange(3 * 30 * 60, dtype=torch.float32).view(3, 30, 60)
    out = random_resized_crop(img, 16, (1.0, 1.0), (2.0, 2.0), torch.Generator().manual_seed(0))
    assert out.shape == (3, 16, 16)
    center = resize_center_crop(img, 10)  # 30x60 -> 10x20 -> the middle 10x10
    assert center.shape == (3, 10, 10)
    solid = torch.full((3, 30, 60), 200, dtype=torch.uint8)
    x = EvalTransform(10)(solid)
    assert torch.equal(x, torch.full((3, 10, 10), 200, dtype=torch.uint8))
    normalize = Normalize((0.5, 0.25, 0.0), (0.25, 0.5, 1.0))
    want = torch.tensor([(200 / 255 - 0.5) / 0.25, (200 / 255 - 0.25) / 0.5, 200 / 255]).view(3, 1, 1).expand(3, 10, 10)
    torch.testing.assert_close(normalize(x), want)
    assert normalize(x[None]).shape == (1, 3, 10, 10) and x.dtype == torch.uint8  # batches too; input untouched


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix(mixup, cutmix):
    images = torch.randn(4, 3, 16, 16)
    targets = torch.eye(5)[[0, 1, 2, 3]]
    mix = draw_mix(16, 16, mixup, cutmix, torch.Generator().manual_seed(3))
    assert mix == draw_mix(16, 16, mixup, cutmix, torch.Generator().manual_seed(3))
    mixed, soft = mix.images(images), mix.targets(targets)
    assert torch.equal(mixed, mix.images(images)) and mixed.shape == images.shape
    torch.testing.assert_close(soft.sum(-1), torch.ones(4))
    torch.testing.assert_close(soft[0, 0], torch.tensor(mix.lam))  # image 0 is mixed with image 3 (reversed)
    torch.testing.assert_close(soft[0, 3], torch.tensor(1 - mix.lam))
    from_first = (mixed[0] == images[0]).all(0).float().mean().item()
    if mix.box is None:  # mixup: a weighted sum of the pair
        torch.testing.assert_close(mixed[0], images[0] * mix.lam + images[3] * (1 - mix.lam))
    else:  # cutmix: the label weight is the area kept
        assert from_first == pytest.approx(mix.lam)
    if mixup == 0:
        assert mix.box is not None
    assert draw_mix(16, 16, 0.0, 0.0) is None  # both off


# --- generated shapes ------------------------------------------------------------------------
def test_every_shape_draws_pixels_in_its_box():
    for shape in SHAPES:
        image = Image.new("RGB", (40, 40), (0, 0, 0))
        draw_shape(ImageDraw.Draw(image), shape, COLORS["red"], (10, 10, 30, 30), angle=15)
        red = np.asarray(image)[..., 0]
        ys, xs = np.nonzero(red > 128)
        assert 40 < len(ys) < 400, shape
        assert ys.min() >= 5 and ys.max() <= 35 and xs.min() >= 5 and xs.max() <= 35, shape
    with pytest.raises(ValueError, match="unknown shape"):
        draw_shape(ImageDraw.Draw(image), "blob", COLORS["red"], (0, 0, 9, 9))
    background = random_background(np.random.default_rng(0), (20, 10))
    assert background.size == (20, 10) and background.mode == "RGB"


def test_shapes_dataset_is_deterministic_and_balanced():
    train = ShapesDataset("train", 32, 48, seed=0)
    again = ShapesDataset("train", 32, 48, seed=0)
    val = ShapesDataset("val", 32, 48, seed=0)
    assert len(SHAPES) >= 12 and train.class_names == SHAPES
    x, y = train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, again[5][0]) and y == again[5][1]
    assert not torch.equal(x, val[5][0])  # the val split is its own stream
    assert not torch.equal(x, ShapesDataset("train", 32, 48, seed=1)[5][0])
    assert np.bincount([train[i][1] for i in range(48)]).tolist() == [4] * 12
    with pytest.raises(UserError, match="data.image_size=8"):
        ShapesDataset("train", 8, 10)
