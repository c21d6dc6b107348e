"""Image augmentation as plain torch tensor ops (no torchvision), shared by the ViT and CLIP tasks.

Every random op takes an explicit ``torch.Generator``; the tasks seed one per item from the item's
global draw position, so the same step sees the same pixels after a resume and on any world size.
Images are CHW uint8 tensors in and out of the train/eval transforms (the DataLoader workers); ``Normalize``
and ``Mix`` (mixup/cutmix, drawn in the collate, applied by the task) run on the batch where the model is, so
the workers hand over a quarter of the bytes of float32 images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a CHW tensor to (height, width), anti-aliased when shrinking; float out."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img.float()
    return F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize to
    ``size`` x ``size``. Same sampling as torchvision's RandomResizedCrop (10 tries, then a centre crop)."""
    _, h, w = img.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return resize(img[:, top : top + ch, left : left + cw], (size, size))
    # Fallback: the whole image cropped to the nearest allowed aspect ratio.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(img[:, top : top + ch, left : left + cw], (size, size))


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Eval transform: scale the shorter side to ``size``, then take the central ``size`` x ``size`` square."""
    _, h, w = img.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = resize(img, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top : top + size, left : left + size]


def hflip(img: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror left-right with probability ``p``."""
    return img.flip(-1) if p > 0 and float(torch.rand((), generator=generator)) < p else img


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    return img.round().clamp_(0, 255).to(torch.uint8)


class Normalize:
    """uint8 pixels -> float32 (x/255 - mean) / std per channel, on the images' device (kept per device,
    so the step makes no host-to-device copy of the constants)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.constants = {torch.device("cpu"): (1 / (255 * s), m / s)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self.constants:
            self.constants[images.device] = tuple(c.to(images.device) for c in self.constants[torch.device("cpu")])
        scale, shift = self.constants[images.device]
        return images.float().mul_(scale).sub_(shift)


class TrainTransform:
    """uint8 CHW -> random resized crop -> horizontal flip -> uint8 CHW."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        img = random_resized_crop(img, self.size, self.scale, self.ratio, generator)
        return to_uint8(hflip(img, self.hflip, generator))


class EvalTransform:
    """uint8 CHW -> resize shorter side + centre crop -> uint8 CHW (deterministic)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_uint8(resize_center_crop(img, self.size))


@dataclass(frozen=True)
class Mix:
    """One batch's mixup or cutmix: the batch is mixed with itself in reversed order (timm's convention).

    ``lam`` weighs the original targets (for cutmix: the kept area after clipping the box to the image);
    ``box`` = (y0, y1, x0, x1) is the region pasted from the reversed batch, None for mixup."""

    lam: float
    box: tuple[int, int, int, int] | None = None

    def images(self, images: torch.Tensor) -> torch.Tensor:
        flipped = images.flip(0)
        if self.box is None:
            return images * self.lam + flipped * (1 - self.lam)
        y0, y1, x0, x1 = self.box
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        return images

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities mixed by the same weight."""
        return targets * self.lam + targets.flip(0) * (1 - self.lam)


def draw_mix(
    height: int, width: int, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator | None = None
) -> Mix | None:
    """A Mix for a batch of ``height`` x ``width`` images; with both options on, each batch picks one at
    random; None when both are off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < 0.5)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    if not use_cutmix:
        return Mix(lam)
    cut = math.sqrt(1 - lam)
    ch, cw = round(height * cut), round(width * cut)
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return Mix(1 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """Beta(alpha, alpha) from two seeded gamma draws (torch.distributions ignores generators)."""
    a = torch._standard_gamma(torch.full((2,), alpha), generator=generator)
    return float(a[0] / a.sum())
