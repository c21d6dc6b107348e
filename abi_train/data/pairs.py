"""Image-caption pairs from local files, and the pieces every CLIP data source shares.

``data.path`` may be
  - a CSV or JSON-lines file of rows (image path, caption); paths are relative to the file;
  - a ``save_to_disk`` folder, parquet/arrow file(s), or an imagefolder with a metadata.jsonl/csv
    that has a caption column (anything ``datasets`` opens locally);
with the columns named by ``data.image_field`` and ``data.text_field``. Images decode through
images.load_image (RGB, any mode); an unreadable one is replaced by the next readable pair and counted.

Captions become ``[SOT] tokens [EOT]`` padded with EOT to the model's context length; the text tower
pools at the first EOT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from abi_train.data import CaptionData
from abi_train.data.images import (
    ImageFolder,
    load_hf_splits,
    load_image,
    pick_train_val,
    require_readable,
    select_image_columns,
    to_tensor,
)
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

SOT = "<|startoftext|>"

Item = tuple[torch.Tensor, str] | None  # (uint8 CHW image, caption), None when the image is unreadable


class CaptionEncoder:
    """caption -> int64 (context_length,): [SOT] ids [EOT] then EOT padding; long captions are cut
    so the EOT always fits. SOT is left out for a loaded tokenizer without that token."""

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        if context_length < 2:
            raise UserError(f"model.context_length={context_length} must be at least 2 (start and end tokens)")
        self.tokenizer, self.context_length = tokenizer, context_length
        self.eot_id: int = tokenizer.eos_id
        self.sot_id: int | None = tokenizer.hf.token_to_id(SOT)
        self.prefix = [] if self.sot_id is None else [self.sot_id]

    def __call__(self, text: str) -> torch.Tensor:
        ids = (self.prefix + self.tokenizer.encode(text))[: self.context_length - 1] + [self.eot_id]
        return torch.tensor(ids + [self.eot_id] * (self.context_length - len(ids)), dtype=torch.long)


class PairDataset(Dataset):
    """A source of (uint8 image, caption) items -> {"image": transformed uint8, "tokens", "skipped"}.

    An unreadable image (a None item) is replaced by the next readable pair instead of being dropped:
    every rank must bring equally many pairs to the loss's all_gather. ``skipped`` counts the
    replacements (workers cannot update a counter in the main process, so the batch carries it).
    """

    def __init__(self, source: Any, transform: Any, encoder: CaptionEncoder) -> None:
        self.source, self.transform, self.encoder = source, transform, encoder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        for skipped in range(n):
            item = self.source[(index + skipped) % n]
            if item is not None:
                image, caption = item
                return {
                    "image": self.transform(image),
                    "tokens": self.encoder(caption),
                    "caption": caption,
                    "skipped": skipped,
                }
        raise UserError(f"none of the {n} images of the caption data could be read")


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": torch.stack([x["image"] for x in items]),
        "tokens": torch.stack([x["tokens"] for x in items]),
        "skipped": sum(x["skipped"] for x in items),
    }


class CaptionPairs(Dataset):
    """A ``datasets.Dataset`` with an image column (Image feature, or file paths relative to the
    data's folder) and a caption column. Items are (uint8 CHW image, caption) or None."""

    def __init__(self, ds: Any, image_field: str, text_field: str, where: str) -> None:
        ds = select_image_columns(ds, image_field, ("data.text_field", text_field), where)
        self.all_captions: list[str] = ds[text_field]
        bad = next((i for i, c in enumerate(self.all_captions) if not isinstance(c, str) or not c.strip()), None)
        if bad is not None:
            raise UserError(f"row {bad} of {where} has no caption in data.text_field={text_field!r}")
        self.base_dir = Path(where).parent if Path(where).is_file() else Path(where)
        self.ds, self.image_field = ds, image_field

    def __len__(self) -> int:
        return len(self.ds)

    def caption(self, index: int) -> str:
        return self.all_captions[index]

    def captions(self) -> list[str]:
        return self.all_captions

    def __getitem__(self, index: int) -> Item:
        value = self.ds[index][self.image_field]
        image = load_image(self.base_dir / value if isinstance(value, str) else value)
        return None if image is None else (to_tensor(image), self.all_captions[index])


def _open(path: str, image_field: str, text_field: str) -> tuple[CaptionPairs, CaptionPairs | None]:
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"caption data {path} does not exist")
    train, val = pick_train_val(load_hf_splits(root), root)
    return (
        CaptionPairs(train, image_field, text_field, str(root)),
        None if val is None else CaptionPairs(val, image_field, text_field, str(root)),
    )


def load_pairs(d: DictConfig) -> tuple[Dataset, Dataset, ImageFolder | None]:
    """(train, val, zero-shot image folder or None) from the ``data=pairs`` config.

    Validation: ``data.val_path``, else a val/validation/test split of ``data.path``, else
    ``data.val_size`` pairs held out of the training rows at random (seeded by ``data.seed``).
    """
    if not d.get("path"):
        raise UserError("data=pairs needs data.path (a CSV/JSON-lines file of image,caption rows or a datasets folder)")
    train, val = _open(d.path, d.image_field, d.text_field)
    if d.get("val_path"):
        val = _open(d.val_path, d.image_field, d.text_field)[0]
    if val is None:
        n, n_val = len(train), int(d.val_size)
        if not 0 < n_val < n:
            raise UserError(f"data.val_size={n_val} cannot split {n} pairs into train and val; set data.val_path")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(d.seed))).tolist()
        train, val = Rows(train, sorted(order[n_val:])), Rows(train, sorted(order[:n_val]))
    require_readable(train, f"data.path={d.path}")
    require_readable(val, "the validation pairs")
    zero_shot = None
    if d.get("zero_shot_path"):
        zero_shot = ImageFolder(Path(d.zero_shot_path).expanduser())
        if not zero_shot.class_names:
            raise UserError(f"data.zero_shot_path={d.zero_shot_path} has no class folders")
        require_readable(zero_shot, f"data.zero_shot_path={d.zero_shot_path}")
    return train, val, zero_shot


class Rows(Dataset):
    """The rows ``indices`` of a CaptionPairs (a train/val split)."""

    def __init__(self, pairs: CaptionPairs, indices: list[int]) -> None:
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def caption(self, index: int) -> str:
        return self.pairs.caption(self.indices[index])

    def captions(self) -> list[str]:
        return [self.pairs.caption(i) for i in self.indices]

    def __getitem__(self, index: int) -> Item:
        return self.pairs[self.indices[index]]


def open_pairs(d: DictConfig, image_size: int) -> CaptionData:
    """The ``data=pairs`` opener (abi_train.data.SOURCES): images keep their own size (the task resizes
    to ``image_size``); zero-shot classes are data.zero_shot_path's folders, prompts data.templates."""
    train, val, zero_shot = load_pairs(d)
    class_names = zero_shot.class_names if zero_shot is not None else []
    return CaptionData(train, val, zero_shot, class_names, list(d.templates))
