"""Image classification with a ViT: cross entropy (label smoothing, mixup/cutmix options), top-1/top-5.

Data is ``data=shapes`` (generated on the fly, the offline default) or ``data=images`` (an image folder or
a local Hugging Face dataset). Every training item's augmentation is seeded by its global draw position,
so a resumed run sees the very same pixels as an uninterrupted one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from abi_train.checkpoint import load_meta
from abi_train.data import data_source
from abi_train.data.augment import EvalTransform, Normalize, TrainTransform, draw_mix
from abi_train.data.images import collate_images
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import all_reduce_sum, eval_batch_count, eval_shard, pad_batches
from abi_train.errors import UserError
from abi_train.tasks.base import EvalResult, Task

GRID_IMAGES = 16  # validation images shown with their predictions in TensorBoard


def item_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for the item drawn at global ``position`` of the run."""
    return int(np.random.SeedSequence([seed, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Transformed(Dataset):
    """Applies a transform to (uint8 image, label) items of ``base``; unreadable items stay None.

    Training keys are (index, position) pairs: the transform's generator is seeded from the position.
    """

    def __init__(self, base: Dataset, transform: Any, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | None:
        index, position = key if isinstance(key, tuple) else (key, -1)
        item = self.base[index]
        if item is None:
            return None
        gen = torch.Generator().manual_seed(item_seed(self.seed, position)) if position >= 0 else None
        return self.transform(item[0], gen), item[1], position


class WithPositions:
    """Batch sampler that pairs each index with its global draw position in GlobalBatchSampler's order
    (step * global_batch + offset): a new augmentation every epoch, the same one after a resume and
    on any world size."""

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        for k, indices in enumerate(s):
            step, micro = divmod(k, s.accumulation)
            first = s.first_position(s.start_step + step, micro)
            yield [(index, first + j) for j, index in enumerate(indices)]


class TrainCollate:
    """Stack a training batch; with mixup/cutmix on, draw the batch's ``mix`` (applied to the images where
    the model is) with a generator seeded by the batch's first draw position, and add the soft ``targets``
    it gives (label smoothing folded in)."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, label_smoothing: float, seed: int) -> None:
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.label_smoothing, self.seed = label_smoothing, seed

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        batch = collate_images(items)
        if (self.mixup > 0 or self.cutmix > 0) and len(batch["labels"]):
            first = next(x[2] for x in items if x is not None)
            gen = torch.Generator().manual_seed(item_seed(self.seed + 1, first))
            smooth = self.label_smoothing
            targets = F.one_hot(batch["labels"], self.num_classes).float() * (1 - smooth) + smooth / self.num_classes
            mix = draw_mix(*batch["images"].shape[-2:], self.mixup, self.cutmix, gen)
            batch["targets"], batch["mix"] = mix.targets(targets), mix
        return batch


def image_size_from(
    source: dict[str, Any], requested: int | None, key: str, origin: Path | str
) -> tuple[int, str | None]:
    """The image size of a run that starts from ``source`` (init_from's ViT or CLIP config): ``requested`` (the
    value of ``key``: data.image_size, or an explicit model.image_size) or the source's own; with a note when the
    position embedding is resampled to it (models.vit.adapt_tower). Off the source's patch grid: a UserError."""
    old, patch = source["image_size"], source["patch_size"]
    size = int(requested or old)
    if size <= 0 or size % patch:  # (without init_from the model says it)
        near = patch * max(1, round(size / patch))
        raise UserError(
            f"{key}={size} is not a multiple of the patch size {patch} of init_from={origin}; "
            f"valid: a multiple of {patch}, e.g. {near}"
        )
    if size == old:
        return size, None
    g, h = old // patch, size // patch
    return size, (
        f"position embedding resampled: {old} -> {size} px ({g}x{g} -> {h}x{h} patches, bicubic, class token kept)"
    )


class ViTTask(Task):
    family: ClassVar[str] = "vit"
    unit: ClassVar[str] = "images"

    def setup(self, artifact_dir: Path | None) -> None:
        """With init_from (``self.pretrained``) the source gives the image size unless data.image_size asks for
        another (then its position embedding is resampled: models.vit.adapt_state_dict) and its normalisation
        (the source's image_mean/image_std win over data.mean/data.std; a source that does not say, e.g. an HF
        folder without preprocessor_config.json, keeps the data's). Data with another class count than the
        source's head (or a source without one) gets a fresh head. Each change is one line on stderr. The
        data's class names are the ones stored with the run."""
        d, seed = self.cfg.data, int(self.cfg.trainer.seed)
        source = self.pretrained.model_config if self.pretrained is not None else None
        arch = source["arch"] if source is not None else self.cfg.model.get("arch")
        if arch != "vit":
            raise UserError(
                f"task vit needs a ViT model (model.arch=vit), got arch {arch!r}; "
                "use model=vit-tiny, vit-s16 or vit-b16"
            )
        data = data_source(d, self.family)  # before any data.KEY: a wrong group is one line, not a missing key
        self.image_size = d.get("image_size") or self.cfg.model.get("image_size")
        self.notes: list[str] = []  # what init_from's weights are adapted to, said once at setup
        if source is not None:
            explicit = self.cfg.model.get("image_size") if "image_size" in self.model_overrides else None
            key = "data.image_size" if d.get("image_size") else "model.image_size"
            self.image_size, note = image_size_from(source, d.get("image_size") or explicit, key, self.pretrained.path)
            self.notes += [note] if note else []
        if not self.image_size:
            raise UserError("no image size: set data.image_size or model.image_size")
        images = data.open(d, image_size=self.image_size)
        train, val, self.class_names = images.train, images.val, images.class_names
        if artifact_dir is not None:
            stored = load_meta(artifact_dir)["metadata"].get("class_names")
            if stored != self.class_names:
                raise UserError(f"the classes of the data differ from those of checkpoint {artifact_dir}")

        self.mean, self.std = tuple(d.mean), tuple(d.std)
        if source is not None:
            n, head = len(self.class_names), source.get("num_classes") or 0
            if head != n:
                has = f"has {head}" if head else "has no head"
                self.notes.append(f"new classifier head: {n} classes (init_from {has})")
            info = self.pretrained.metadata
            if info.get("image_mean") and info.get("image_std"):
                self.mean, self.std = tuple(info["image_mean"]), tuple(info["image_std"])
        self.normalize = Normalize(self.mean, self.std)
        a = d.augment
        self.label_smoothing = float(a.label_smoothing)
        transform = TrainTransform(self.image_size, tuple(a.crop_scale), tuple(a.crop_ratio), a.hflip)
        self.train_set = Transformed(train, transform, seed)
        self.val_set = Transformed(val, EvalTransform(self.image_size))
        self.collate = TrainCollate(len(self.class_names), a.mixup, a.cutmix, self.label_smoothing, seed)
        self.skipped = 0  # unreadable training images since this process started
        self.val_skipped = 0  # unreadable images in the last validation pass
        if self.dist.is_main and artifact_dir is None:  # a resumed run's weights are already adapted
            for note in self.notes:
                print(note, file=sys.stderr, flush=True)

    def model_config(self) -> dict[str, Any]:
        config = self.model_options("vit")
        n = len(self.class_names)
        if config.get("num_classes") is None or (
            self.pretrained is not None and "num_classes" not in self.model_overrides
        ):
            config["num_classes"] = n  # the data's: with init_from, a new head when the source's differs
        elif config["num_classes"] != n:
            raise UserError(
                f"model.num_classes={config['num_classes']} but the data has {n} classes; set model.num_classes=null"
            )
        config["image_size"] = self.image_size
        return config

    def num_train_items(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=int(self.cfg.trainer.num_workers),
            pin_memory=torch.cuda.is_available() and str(self.cfg.trainer.device) != "cpu",
            # Own generator: creating the iterator must not draw from the global RNG (exact resume).
            generator=torch.Generator().manual_seed(int(self.cfg.trainer.seed)),
            **kwargs,
        )

    def train_loader(self, sampler: GlobalBatchSampler) -> Iterable[Any]:
        workers = int(self.cfg.trainer.num_workers) > 0
        return self._loader(
            self.train_set, batch_sampler=WithPositions(sampler), collate_fn=self.collate, persistent_workers=workers
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.skipped += batch["skipped"]
        images, labels = batch["images"], batch["labels"]
        if len(labels) == 0:  # every image of this micro-batch was unreadable: a zero loss, zero gradients
            size = self.image_size
            return model(torch.zeros(1, 3, size, size, device=images.device)).sum() * 0.0, {}
        images = self.normalize(images)
        if "mix" in batch:
            images = batch["mix"].images(images)
        logits = model(images).float()
        if "targets" in batch:
            return F.cross_entropy(logits, batch["targets"]), {}
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"train/top1": (logits.argmax(-1) == labels).float().mean().detach()}

    def items_in(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def synthetic_batch(self, batch_size: int) -> Any:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(
            0, 256, (batch_size, 3, self.image_size, self.image_size), dtype=torch.uint8, generator=gen
        )
        labels = torch.randint(0, len(self.class_names), (batch_size,), generator=gen)
        return {"images": images, "labels": labels, "skipped": 0}

    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """Loss, top-1 and top-5 over the first eval_batches x global batch size val images: the ranks share
        them out and sum, so any world size gives one process's numbers. The grid shows rank 0's images."""
        tc = self.cfg.trainer
        global_batch = int(tc.global_batch_size or tc.batch_size * self.dist.world_size)
        n = min(len(self.val_set), int(tc.eval_batches) * global_batch)
        shard = Subset(self.val_set, eval_shard(n, self.dist.rank, self.dist.world_size))
        loader = self._loader(shard, batch_size=int(tc.batch_size), collate_fn=collate_images)
        # Sums of: loss, top-1 hits, top-5 hits, images, skipped val images, skipped train images.
        stats = torch.zeros(6, dtype=torch.float64, device=device)
        stats[5] = self.skipped
        shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        size = self.image_size
        # As many forward calls on every rank (FSDP: each is collective): a short shard, or a batch whose
        # images were all unreadable, runs one blank image that is not counted.
        for batch in pad_batches(loader, eval_batch_count(n, self.dist.world_size, int(tc.batch_size))):
            if batch is not None:
                stats[4] += batch["skipped"]
            if batch is None or len(batch["labels"]) == 0:
                model(torch.zeros(1, 3, size, size, device=device))
                continue
            images, labels = batch["images"], batch["labels"].to(device)
            logits = model(self.normalize(images.to(device))).float()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            stats[0] += F.cross_entropy(logits, labels, reduction="sum")
            stats[1] += (top[:, 0] == labels).sum()
            stats[2] += (top == labels[:, None]).any(-1).sum()
            stats[3] += len(labels)
            if sum(len(s[0]) for s in shown) < GRID_IMAGES:
                shown.append((images[:GRID_IMAGES], top[:GRID_IMAGES, 0].cpu(), labels[:GRID_IMAGES].cpu()))
        loss, top1, top5, count, val_skipped, train_skipped = all_reduce_sum(stats).tolist()
        count = max(count, 1.0)
        scalars = {
            "val/loss": loss / count,
            "val/top1": top1 / count,
            "val/top5": top5 / count,
            "data/skipped_images": train_skipped,
        }
        if val_skipped:
            scalars["data/skipped_val_images"] = val_skipped
        self.val_skipped = val_skipped
        images = {}
        if shown and self.dist.is_main:
            grid_images, preds, labels = (torch.cat(parts)[:GRID_IMAGES] for parts in zip(*shown, strict=True))
            images["val/predictions"] = prediction_grid(grid_images, preds.tolist(), labels.tolist(), self.class_names)
        return EvalResult(scalars, images=images)

    def metadata(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "image_size": self.image_size,
        }

    def close(self) -> None:
        if self.skipped or self.val_skipped:
            rank = f"rank {self.dist.rank}: " if self.dist.enabled else ""
            print(
                f"{rank}skipped unreadable images: {self.skipped} in training batches, "
                f"{int(self.val_skipped)} in the last validation pass",
                file=sys.stderr,
            )


def prediction_grid(images: torch.Tensor, preds: list[int], labels: list[int], class_names: list[str]) -> np.ndarray:
    """(N, 3, H, W) uint8 images -> one HWC uint8 grid; each tile is captioned with the prediction
    (green when right) and, when wrong, the true class (red)."""
    tile, caption, cols = max(96, images.shape[-1]), 28, 4
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * tile, rows * (tile + caption)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    for i, (image, pred, label) in enumerate(zip(images, preds, labels, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
        grid.paste(pil.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        right = pred == label
        color = (90, 220, 90) if right else (240, 80, 80)
        draw.text((x + 3, y + tile + 1), f"pred: {class_names[pred]}", fill=color, font=font)
        if not right:
            draw.text((x + 3, y + tile + 14), f"true: {class_names[label]}", fill=(230, 230, 230), font=font)
    return np.asarray(grid)
