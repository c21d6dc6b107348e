"""CLIP: contrastive image-text pretraining (InfoNCE or SigLIP) with zero-shot and retrieval evaluation.

Data is ``data=captions`` (generated scenes, offline) or ``data=pairs`` (CSV / JSON lines / HF datasets).
The tokenizer comes from the checkpoint on resume, else ``data.tokenizer``, else it is trained on the
training captions. The loss is the top-level ``loss`` key (clip | siglip, set in recipes/clip.yaml);
it is also a model option because SigLIP adds a learned bias.

Accumulation is refused: the loss needs every negative of the step in one micro-batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader

from abi_train.data import data_source
from abi_train.data.augment import EvalTransform, Normalize
from abi_train.data.pairs import SOT, CaptionEncoder, PairDataset, collate_pairs
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.synthetic_pairs import with_article
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.distributed import all_reduce_sum, eval_shard, gather_shards
from abi_train.errors import UserError
from abi_train.losses import clip_loss, siglip_loss
from abi_train.tasks.base import EvalResult, Task
from abi_train.tasks.vit import image_size_from

LOSSES = ("clip", "siglip")
SIM_PAIRS = 12  # pairs shown in the similarity-matrix image


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class CLIPTask(Task):
    family: ClassVar[str] = "clip"
    unit: ClassVar[str] = "pairs"
    supports_accumulation: ClassVar[bool] = False

    def setup(self, artifact_dir: Path | None) -> None:
        """With init_from (``self.pretrained``) the source gives the image size, context length, vocabulary
        size, end-of-text id and normalisation (its image_mean/image_std win over data.image_mean/std) and
        its tokenizer when it has one (else data.tokenizer; an imported CLIP without either is an error:
        a freshly trained tokenizer would not match its embeddings). The loss must be the source's: an
        imported CLIP has no SigLIP bias."""
        cfg, d = self.cfg, self.cfg.data
        self.loss_name = cfg.get("loss", "clip")
        if self.loss_name not in LOSSES:
            raise UserError(f"loss={self.loss_name!r} is not known; valid: {', '.join(LOSSES)}")
        data = data_source(d, self.family)  # before any data.KEY: a wrong group is one line, not a missing key
        source = self.pretrained.model_config if self.pretrained is not None else None
        if source is not None and source.get("loss", "clip") != self.loss_name:
            bias = "has no" if source.get("loss", "clip") == "clip" else "has a"
            raise UserError(
                f"loss={self.loss_name} but init_from={self.pretrained.path} is a {source.get('loss', 'clip')}-loss "
                f"CLIP (it {bias} logit_bias); use loss={source.get('loss', 'clip')}"
            )
        self.image_size = int(cfg.model.image_size)
        if source is not None:  # the source's size, or model.image_size=N (its position embedding resampled)
            explicit = cfg.model.get("image_size") if "image_size" in self.model_overrides else None
            self.image_size, note = image_size_from(source, explicit, "model.image_size", self.pretrained.path)
            if note and self.dist.is_main and artifact_dir is None:
                print(note, file=sys.stderr, flush=True)
        self.context_length = int(source["context_length"] if source is not None else cfg.model.context_length)
        self.mean, self.std = tuple(d.image_mean), tuple(d.image_std)
        info = self.pretrained.metadata if self.pretrained is not None else {}
        if info.get("image_mean") and info.get("image_std"):
            self.mean, self.std = tuple(info["image_mean"]), tuple(info["image_std"])
        self.skipped = 0
        pairs = data.open(d, image_size=self.image_size)
        train, val, self.zero_shot = pairs.train, pairs.val, pairs.zero_shot
        self.class_names, self.templates, self.held_out = pairs.class_names, pairs.templates, pairs.held_out

        tokenizer_path = d.get("tokenizer")
        if artifact_dir is not None and (Path(artifact_dir) / "tokenizer.json").is_file():
            tokenizer_path = Path(artifact_dir) / "tokenizer.json"  # resume: the run's own tokenizer
        resumed = tokenizer_path is not None and tokenizer_path != d.get("tokenizer")
        if self.pretrained is not None and self.pretrained.tokenizer is not None and not resumed:
            self.tokenizer = self.pretrained.tokenizer
        elif tokenizer_path:
            self.tokenizer = Tokenizer.load(tokenizer_path)
        elif self.pretrained is not None:
            raise UserError(
                f"init_from={self.pretrained.path} brings no tokenizer (no tokenizer.json); "
                "set data.tokenizer to the tokenizer.json its text tower was trained with"
            )
        else:
            # Every rank trains the same tokenizer from the same captions (deterministic, no barrier).
            self.tokenizer = Tokenizer.train(train.captions(), int(d.vocab_size), special_tokens=(EOS, SOT))
        self.vocab_size = cfg.model.get("vocab_size") or self.tokenizer.vocab_size
        if source is not None:
            self.vocab_size = int(source["vocab_size"])
        if self.tokenizer.vocab_size > self.vocab_size:
            raise UserError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than model.vocab_size="
                f"{self.vocab_size}; raise model.vocab_size or set it to null (the tokenizer's size)"
            )
        self.encoder = CaptionEncoder(self.tokenizer, self.context_length)
        if source is not None and self.encoder.eot_id != source["eot_id"]:
            raise UserError(
                f"the tokenizer's end-of-text id {self.encoder.eot_id} is not the {source['eot_id']} that "
                f"init_from={self.pretrained.path} pools at; use the tokenizer the model was trained with"
            )
        # No random augmentation: flips and crops would contradict captions such as "left of".
        self.transform = EvalTransform(self.image_size)
        self.normalize = Normalize(self.mean, self.std)
        self.train_set = PairDataset(train, self.transform, self.encoder)
        self.val_set = PairDataset(val, self.transform, self.encoder)

    def model_config(self) -> dict[str, Any]:
        config = self.model_options("clip")
        config.update(vocab_size=self.vocab_size, eot_id=self.encoder.eot_id, loss=self.loss_name)
        return config

    def num_train_items(self) -> int:
        return len(self.train_set)

    def train_loader(self, sampler: GlobalBatchSampler) -> Iterable[Any]:
        workers = self.cfg.trainer.num_workers
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and str(self.cfg.trainer.device) != "cpu",
            collate_fn=collate_pairs,
        )

    def _loss(
        self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, **kw: Any
    ) -> torch.Tensor:
        # The similarity logits in fp32 even under autocast: bf16 would round logits near 100 by ~0.5.
        with torch.autocast(img.device.type, enabled=False):
            img, txt, scale = img.float(), txt.float(), scale.float()
            if self.loss_name == "siglip":
                return siglip_loss(img, txt, scale, bias.float(), **kw)
            return clip_loss(img, txt, scale, **kw)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.skipped += batch["skipped"]
        img, txt, scale, bias = model(self.normalize(batch["images"]), batch["tokens"])
        logs = {"train/logit_scale": scale.detach()}
        if bias is not None:
            logs["train/logit_bias"] = bias.detach()
        return self._loss(img, txt, scale, bias), logs

    def items_in(self, batch: Any) -> int:
        return batch["tokens"].shape[0]

    def synthetic_batch(self, batch_size: int) -> Any:
        gen = torch.Generator().manual_seed(0)
        size, context = self.image_size, self.encoder.context_length
        tokens = torch.randint(0, self.vocab_size, (batch_size, context), generator=gen)
        tokens[:, -1] = self.encoder.eot_id  # full-length captions: the text tower pools at the last position
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
        return {"images": images, "tokens": tokens, "skipped": 0}

    def after_optimizer_step(self, model: nn.Module) -> None:
        model.clamp_logit_scale()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """val/loss (in chunks of the global batch size, as in training) and retrieval recall@1/5/10 over
        the whole val set; zero-shot top-1/top-5 over the zero-shot images. Each rank embeds its share of
        the items; the embeddings are gathered, so every rank computes one process's numbers."""
        dist = self.dist
        n, size = len(self.val_set), self.cfg.trainer.batch_size
        mine = list(eval_shard(n, dist.rank, dist.world_size))
        real = len(mine)
        # Every rank embeds ceil(n / world) items (the short shards repeat item 0, dropped by the gather),
        # so all ranks make the same number of forward calls.
        mine += [0] * (-(-n // dist.world_size) - real)
        imgs, txts, val_skipped = [], [], 0
        for start in range(0, len(mine), size):
            items = [self.val_set[i] for i in mine[start : start + size]]
            val_skipped += sum(x["skipped"] for x in items[: max(0, real - start)])
            batch = self.to_device(collate_pairs(items), device)
            img, txt, scale, bias = model(self.normalize(batch["images"]), batch["tokens"])
            imgs.append(img.float())
            txts.append(txt.float())
        img, txt = gather_shards(torch.cat(imgs), n), gather_shards(torch.cat(txts), n)
        chunk = size * dist.world_size  # the global batch: CLIP never accumulates
        losses = [
            self._loss(img[i : i + chunk], txt[i : i + chunk], scale, bias, gather=_identity, rank=0)
            * len(img[i : i + chunk])
            for i in range(0, n, chunk)
        ]
        sim = img @ txt.T  # (images, captions); the match of row i is column i
        scalars = {"val/loss": (torch.stack(losses).sum() / n).item()}
        scalars |= _recall(sim, "i2t") | _recall(sim.T, "t2i")
        if self.zero_shot is not None:
            scalars |= self._zero_shot(model, device)
        counts = all_reduce_sum(torch.tensor([self.skipped, val_skipped], dtype=torch.float64, device=device))
        scalars["data/skipped_images"] = counts[0].item()
        if counts[1]:
            scalars["data/skipped_val_images"] = counts[1].item()
        shown = [self.val_set[i] for i in range(min(SIM_PAIRS, n))]
        thumbs = torch.stack([x["image"] for x in shown]).permute(0, 2, 3, 1)
        image = _similarity_image(sim[: len(shown), : len(shown)].cpu(), thumbs.numpy())
        captions = "\n".join(f"{i}: {x['caption']}" for i, x in enumerate(shown))
        return EvalResult(scalars, texts={"val/similarity_captions": captions}, images={"val/similarity": image})

    def _zero_shot(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Class embeddings = renormalised mean over the prompt templates (every rank embeds all prompts);
        the ranks share out the images and gather their (logits, label) rows; top-1/top-5 over them."""
        size, dist = self.cfg.trainer.batch_size, self.dist
        prompts = [t.format(with_article(name)) for name in self.class_names for t in self.templates]
        tokens = torch.stack([self.encoder(p) for p in prompts])
        emb = torch.cat(
            [model.encode_text(tokens[i : i + size].to(device)).float() for i in range(0, len(tokens), size)]
        )
        class_emb = nn.functional.normalize(emb.view(len(self.class_names), len(self.templates), -1).mean(1), dim=-1)
        n = len(self.zero_shot)
        mine = list(eval_shard(n, dist.rank, dist.world_size))
        mine += [None] * (-(-n // dist.world_size) - len(mine))  # padding rows: same forward calls everywhere
        items = [self.zero_shot[i] if i is not None else None for i in mine]
        blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        rows = []  # per item: its class logits, then its label (-1: unreadable or padding)
        for start in range(0, len(items), size):
            part = items[start : start + size]
            images = torch.stack([blank if x is None else self.transform(x[0]) for x in part])
            logits = model.encode_image(self.normalize(images.to(device))).float() @ class_emb.T
            labels = torch.tensor([-1 if x is None else x[1] for x in part], device=device, dtype=logits.dtype)
            rows.append(torch.cat([logits, labels[:, None]], dim=1))
        table = gather_shards(torch.cat(rows), n)
        table = table[table[:, -1] >= 0]
        logits, labels = table[:, :-1], table[:, -1].long()
        top = logits.topk(min(5, len(class_emb)), dim=1).indices
        hit1 = top[:, 0] == labels
        out = {
            "val/zero_shot_top1": hit1.float().mean().item(),
            "val/zero_shot_top5": (top == labels[:, None]).any(1).float().mean().item(),
        }
        held = torch.tensor([label in self.held_out for label in labels.tolist()], device=device, dtype=torch.bool)
        if held.any():
            out["val/zero_shot_top1_held_out"] = hit1[held].float().mean().item()
        return out

    def save_artifacts(self, directory: Path) -> None:
        self.tokenizer.save(Path(directory) / "tokenizer.json")

    def metadata(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "context_length": self.encoder.context_length,
            "tokenizer": {"bos_id": self.encoder.sot_id, "eos_id": self.encoder.eot_id, "pad_id": self.encoder.eot_id},
            "eot_id": self.encoder.eot_id,
            "loss": self.loss_name,
            "class_names": self.class_names,
            "templates": self.templates,
        }

    def close(self) -> None:
        if self.skipped:
            rank = f"rank {self.dist.rank}: " if self.dist.enabled else ""
            print(
                f"{rank}skipped {self.skipped} unreadable training images (each replaced by the next pair)",
                file=sys.stderr,
            )


def _recall(sim: torch.Tensor, prefix: str) -> dict[str, float]:
    """Row i's match is column i; recall@k = fraction of rows whose match ranks in the top k."""
    rank = (sim > sim.diagonal()[:, None]).sum(dim=1)
    return {f"val/{prefix}_r@{k}": (rank < k).float().mean().item() for k in (1, 5, 10)}


def _similarity_image(sim: torch.Tensor, thumbs: np.ndarray, cell: int = 32) -> np.ndarray:
    """Rows: val images (thumbnail on the left); columns: their captions in the same order (listed in
    the val/similarity_captions text). Brighter = more similar; a bright diagonal is a good model."""
    n = sim.shape[0]
    canvas = Image.new("RGB", ((n + 1) * cell, n * cell), (0, 0, 0))
    lo, hi = float(sim.min()), float(sim.max())
    level = ((sim - lo) / max(hi - lo, 1e-6)).numpy()
    draw = ImageDraw.Draw(canvas)
    for r in range(n):
        canvas.paste(Image.fromarray(thumbs[r]).resize((cell, cell)), (0, r * cell))
        for c in range(n):
            v = level[r, c]
            colour = (int(255 * v), int(200 * v**0.5), int(255 * (1 - v) * 0.6))  # dark blue -> yellow
            draw.rectangle([(c + 1) * cell, r * cell, (c + 2) * cell - 1, (r + 1) * cell - 1], fill=colour)
    return np.asarray(canvas)
