"""Image augmentation as plain torch tensor ops (no torchvision), shared by the ViT and CLIP tasks.

Every random op takes an explicit ``torch.Generator``; the tasks seed one per item from the item's
global draw position, so the same step sees the same pixels after a resume and on any world size.
Images are CHW tensors: uint8 in, float32 (normalised) out of the train/eval transforms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class Normalize:
    """0..255 pixel values -> (x/255 - mean) / std per channel (as one multiply-subtract)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.shift = 1 / (255 * s), m / s

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mul_(self.scale).sub_(self.shift)


class TrainTransform:
    """uint8 CHW -> random resized crop -> horizontal flip -> normalised float CHW."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.normalize = Normalize(mean, std)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        img = random_resized_crop(img, self.size, self.scale, self.ratio, generator)
        return self.normalize(hflip(img, self.hflip, generator))


class EvalTransform:
    """uint8 CHW -> resize shorter side + centre crop -> normalised float CHW (deterministic)."""

    def __init__(
        self, size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
    ) -> None:
        self.size, self.normalize = size, Normalize(mean, std)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalize(resize_center_crop(img, self.size))


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of ``Normalize`` for display: (..., C, H, W) float -> uint8 in 0..255."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return ((images.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)


def mixup_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with itself in reversed order (timm's convention): with both options on, each
    batch picks one at random. ``targets`` are (B, C) probabilities and are mixed by the same weight
    (for cutmix: the pasted box's true area fraction after clipping to the image)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = _beta(alpha, generator)
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = round(h * cut), round(w * cut)
        cy, cx = int(torch.randint(0, h, (), generator=generator)), int(torch.randint(0, w, (), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + flipped * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """Beta(alpha, alpha) from two seeded gamma draws (torch.distributions ignores generators)."""
    a = torch._standard_gamma(torch.full((2,), alpha), generator=generator)
    return float(a[0] / a.sum())
