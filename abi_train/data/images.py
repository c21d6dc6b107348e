"""Labelled images from local disk: a class-per-folder tree or a Hugging Face ``datasets`` dataset.

``data.path`` may be
  - an image folder: ``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` with split folders
    train and val|validation|test (the Hugging Face imagefolder layout); class names sorted;
  - a ``save_to_disk`` folder (a Dataset or a DatasetDict);
  - parquet/arrow/csv/json file(s) or a folder of them, read with ``datasets.load_dataset``.
Images decode with Pillow and convert to RGB (grayscale, RGBA, palette, CMYK, 16-bit all work). An
unreadable image makes its item ``None``; ``collate_images`` drops those and counts them in the batch,
because DataLoader workers cannot update a counter in the main process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset

from abi_train.data import ImageClassData
from abi_train.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TRAIN_SPLITS = ("train",)
VAL_SPLITS = ("validation", "val", "valid", "test")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}

Item = tuple[torch.Tensor, int] | None  # (uint8 CHW image, label), None when the image is unreadable


def load_image(source: str | Path | bytes | dict | Image.Image) -> Image.Image | None:
    """Decode an image file, raw bytes, a ``datasets`` Image dict ({"bytes", "path"}) or a PIL image
    into an RGB PIL image; None if it cannot be read."""
    try:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()  # decode now, so truncated files fail here and not later in a transform
        return to_rgb(ImageOps.exif_transpose(image))
    # Decoders of arbitrary bytes fail in many ways (OSError, SyntaxError, ValueError,
    # DecompressionBombError, ...): any failure to decode one file means "skip and count it".
    except Exception:
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit grayscale is rescaled, not clipped at 255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's recommended route for palette transparency
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def collate_images(items: list[Any]) -> dict[str, Any]:
    """Stack (image, label) items, dropping unreadable ones (None) and counting them in ``skipped``."""
    kept = [x for x in items if x is not None]
    if not kept:
        return {
            "images": torch.zeros(0, dtype=torch.uint8),
            "labels": torch.zeros(0, dtype=torch.long),
            "skipped": len(items),
        }
    return {
        "images": torch.stack([x[0] for x in kept]),
        "labels": torch.as_tensor([x[1] for x in kept], dtype=torch.long),
        "skipped": len(items) - len(kept),
    }


class ImageFolder(Dataset):
    """``root/<class>/<image files>``; labels index the sorted class folder names (or ``class_names``,
    given for a val folder that must use the training classes)."""

    def __init__(self, root: str | Path, class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_names is None:
            class_names = folders
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise UserError(f"{self.root} has class folders not in the training classes: {', '.join(unknown)}")
        self.class_names = list(class_names)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.files = [
            (path, index[name])
            for name in folders
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        path, label = self.files[index]
        image = load_image(path)
        return None if image is None else (to_tensor(image), label)


def select_image_columns(ds: Any, image_field: str, other: tuple[str, str], where: str) -> Any:
    """Keep the image column and one other (``(config key, column)``), images left undecoded so that we
    decode them ourselves and can skip corrupt ones. UserError naming the key when a column is missing."""
    import datasets

    for key, name in (("data.image_field", image_field), other):
        if name not in ds.column_names:
            raise UserError(f"{key}={name!r} is not a column of {where}; columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([image_field, other[1]])
    if isinstance(ds.features[image_field], datasets.Image):
        ds = ds.cast_column(image_field, datasets.Image(decode=False))
    return ds


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` with an image column and a label column (ClassLabel, int ids or names)."""

    def __init__(
        self, ds: Any, image_field: str, label_field: str, where: str, class_names: list[str] | None = None
    ) -> None:
        import datasets

        ds = select_image_columns(ds, image_field, ("data.label_field", label_field), where)
        labels = ds[label_field]
        feature = ds.features[label_field]
        if isinstance(feature, datasets.ClassLabel):  # ids -> names, so a val split maps by name
            if labels and min(labels) < 0:
                raise UserError(f"{where} has rows without a label (-1) in data.label_field={label_field!r}")
            labels = [feature.names[v] for v in labels]
        if class_names is None:
            if isinstance(feature, datasets.ClassLabel):
                class_names = list(feature.names)
            elif not labels:
                class_names = []
            elif all(isinstance(v, str) for v in labels):
                class_names = sorted(set(labels))
            elif all(isinstance(v, int) for v in labels):
                class_names = [str(i) for i in range(max(labels) + 1)]
            else:
                raise UserError(f"data.label_field={label_field!r} of {where} must hold class ids or class names")
        if labels and isinstance(labels[0], str):
            index = {name: i for i, name in enumerate(class_names)}
            unknown = sorted(set(labels) - set(index))
            if unknown:
                raise UserError(f"labels of {where} not among the training classes: {', '.join(unknown[:10])}")
            labels = [index[v] for v in labels]
        elif not all(isinstance(v, int) and 0 <= v < len(class_names) for v in labels):
            raise UserError(f"data.label_field={label_field!r} of {where} holds ids outside 0..{len(class_names) - 1}")
        # A string image column holds file paths, relative to the dataset's folder.
        self.base_dir = Path(where).parent if Path(where).is_file() else Path(where)
        self.ds, self.image_field, self.labels, self.class_names = ds, image_field, labels, list(class_names)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Item:
        value = self.ds[index][self.image_field]
        image = load_image(self.base_dir / value if isinstance(value, str) else value)
        return None if image is None else (to_tensor(image), self.labels[index])


@dataclass
class ImageData:
    train: Dataset
    val: Dataset | None  # None: the caller splits off data.val_fraction of train
    class_names: list[str]


def _is_class_tree(path: Path) -> bool:
    """Sub-folders and no data files one or two levels down (HF layouts keep parquet in data/ or train/)."""
    has_subdirs = any(p.is_dir() for p in path.iterdir())
    data_files = (p for pattern in ("*", "*/*") for p in path.glob(pattern) if p.suffix.lower() in DATA_FILE_BUILDERS)
    return has_subdirs and next(data_files, None) is None


def load_hf_splits(path: Path) -> dict[str, Any]:
    """A local ``datasets`` dataset as {split: Dataset}."""
    import datasets
    import pyarrow

    if path.is_file() and path.suffix.lower() not in DATA_FILE_BUILDERS:
        raise UserError(f"{path} is not a data file; use {', '.join(DATA_FILE_BUILDERS)} or a folder")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            loaded = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except (FileNotFoundError, datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as e:
        # e.g. a folder with neither class folders nor data files, or a corrupt parquet file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} could not be read as images: {reason}") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def pick_train_val(splits: dict[str, Any], where: Path) -> tuple[Any, Any | None]:
    train = next((splits[s] for s in TRAIN_SPLITS if s in splits), None)
    if train is None and len(splits) == 1:
        train = next(iter(splits.values()))
    if train is None:
        raise UserError(f"{where} has splits {', '.join(splits)} but none called 'train'")
    return train, next((splits[s] for s in VAL_SPLITS if s in splits), None)


def _open(
    key: str, path: str | Path, image_field: str, label_field: str, class_names: list[str] | None = None
) -> tuple[ImageFolder | HFImageDataset, ImageFolder | HFImageDataset | None]:
    """(train, val or None) of one location; ``class_names`` fixes the label ids (for a separate val set)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{key}={path} does not exist")
    saved = (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
    if root.is_dir() and not saved and _is_class_tree(root):
        splits = {p.name: p for p in root.iterdir() if p.is_dir() and p.name in TRAIN_SPLITS + VAL_SPLITS}
        if not splits:
            return ImageFolder(root, class_names), None
        train_root, val_root = pick_train_val(splits, root)
        train = ImageFolder(train_root, class_names)
        return train, ImageFolder(val_root, train.class_names) if val_root is not None else None
    train_split, val_split = pick_train_val(load_hf_splits(root), root)
    train = HFImageDataset(train_split, image_field, label_field, str(root), class_names)
    if val_split is None:
        return train, None
    return train, HFImageDataset(val_split, image_field, label_field, str(root), train.class_names)


def open_image_data(
    path: str | Path | None,
    image_field: str = "image",
    label_field: str = "label",
    val_path: str | Path | None = None,
) -> ImageData:
    """Training images and class names, plus validation images from ``val_path`` or a val split of ``path``."""
    if not path:
        raise UserError("data.path is not set; give an image folder, a save_to_disk folder or parquet file(s)")
    train, val = _open("data.path", path, image_field, label_field)
    if not train.class_names:
        raise UserError(f"data.path={path} has no classes (no class folders or no labels)")
    if val_path:
        val = _open("data.val_path", val_path, image_field, label_field, train.class_names)[0]
    require_readable(train, f"data.path={path}")
    if val is not None:
        require_readable(val, f"validation images of {val_path or path}")
    return ImageData(train, val, train.class_names)


def require_readable(dataset: Dataset, where: str) -> None:
    """UserError unless at least one item decodes (stops at the first readable one)."""
    if len(dataset) == 0:
        raise UserError(f"{where} holds no images")
    for i in range(len(dataset)):
        if dataset[i] is not None:
            return
    raise UserError(f"{where}: none of its {len(dataset)} images could be read")


def split_off(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """A fixed random (train, val) split with ``fraction`` of the items (at least one) in val."""
    n = len(dataset)
    n_val = max(1, round(n * fraction))
    if not 0 < fraction < 1 or n_val >= n:
        raise UserError(f"data.val_fraction={fraction} cannot split {n} images into train and val")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def open_images(d: DictConfig, image_size: int) -> ImageClassData:
    """The ``data=images`` opener (abi_train.data.SOURCES). Images keep their own size (the task's
    transforms crop to ``image_size``); without a validation split, data.val_fraction is held out
    (a fixed subset: the same val set for every seed)."""
    data = open_image_data(d.path, d.image_field, d.label_field, d.get("val_path"))
    train, val = data.train, data.val
    if val is None:
        train, val = split_off(train, float(d.val_fraction))
    return ImageClassData(train, val, data.class_names)
