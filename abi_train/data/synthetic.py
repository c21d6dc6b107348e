"""Procedurally generated images: drawing primitives (shared with CLIP's caption pairs) and the
ShapesDataset classification set. Everything is drawn on the fly from (seed, split, index): no
files, no downloads, and the same item is the same image on every machine and every epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from abi_train.data import ImageClassData
from abi_train.data.images import to_tensor
from abi_train.errors import UserError

# Silhouettes that stay distinct after a small rotation, a flip and downscaling to ~10 px.
SHAPES = [
    "circle",
    "ring",
    "square",
    "frame",
    "triangle",
    "diamond",
    "star",
    "cross",
    "heart",
    "crescent",
    "arrow",
    "hourglass",
]

# Saturated colours, far apart from each other and from the desaturated backgrounds below.
COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (250, 100, 190),
}

_SUPERSAMPLE = 4  # shapes are drawn 4x larger and downscaled: anti-aliased edges


def _star() -> list[tuple[float, float]]:
    """Five points alternating between radius 1 (tips) and 0.42 (notches), first tip straight up."""
    angles = [math.radians(-90 + 36 * i) for i in range(10)]
    return [((1.0, 0.42)[i % 2] * math.cos(a), (1.0, 0.42)[i % 2] * math.sin(a)) for i, a in enumerate(angles)]


# Each shape: a list of (kind, coords, ink) in [-1, 1]^2 (y down); ink 0 cuts a hole.
_PARTS: dict[str, list[tuple[str, list[tuple[float, float]], int]]] = {
    "circle": [("ellipse", [(-1, -1), (1, 1)], 255)],
    "ring": [("ellipse", [(-1, -1), (1, 1)], 255), ("ellipse", [(-0.55, -0.55), (0.55, 0.55)], 0)],
    "square": [("polygon", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "frame": [
        ("polygon", [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], 255),
        ("polygon", [(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)], 0),
    ],
    "triangle": [("polygon", [(0, -1), (0.95, 0.75), (-0.95, 0.75)], 255)],
    "diamond": [("polygon", [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], 255)],
    "star": [("polygon", _star(), 255)],
    "cross": [
        ("polygon", [(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)], 255),
        ("polygon", [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], 255),
    ],
    "heart": [
        ("ellipse", [(-1, -0.85), (0.05, 0.2)], 255),
        ("ellipse", [(-0.05, -0.85), (1, 0.2)], 255),
        ("polygon", [(-0.95, -0.15), (0.95, -0.15), (0, 0.95)], 255),
    ],
    "crescent": [("ellipse", [(-1, -1), (1, 1)], 255), ("ellipse", [(-0.45, -1.05), (1.25, 0.65)], 0)],
    "arrow": [
        ("polygon", [(-1, -0.22), (0.1, -0.22), (0.1, 0.22), (-1, 0.22)], 255),
        ("polygon", [(0.05, -0.75), (1, 0), (0.05, 0.75)], 255),
    ],
    "hourglass": [
        ("polygon", [(-0.8, -1), (0.8, -1), (0, 0.05)], 255),
        ("polygon", [(-0.8, 1), (0.8, 1), (0, -0.05)], 255),
    ],
}


def _ellipse(x0: float, y0: float, x1: float, y1: float, n: int = 48) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _shape_mask(shape: str, side: int, angle: float) -> Image.Image:
    """An 'L' mask of ``side`` x ``side`` pixels with the shape filling the middle 1/1.5 of it
    (the margin keeps rotated corners inside), rotated by ``angle`` degrees counter-clockwise."""
    big = side * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    scale = big / 2 / 1.5
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for kind, coords, ink in _PARTS[shape]:
        points = _ellipse(*coords[0], *coords[1]) if kind == "ellipse" else coords
        # Rotating the points (y points down, so this is counter-clockwise on screen) is much cheaper
        # than rotating the raster.
        draw.polygon(
            [(big / 2 + (x * cos + y * sin) * scale, big / 2 + (y * cos - x * sin) * scale) for x, y in points],
            fill=ink,
        )
    return mask.resize((side, side), Image.Resampling.BOX)


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    color_rgb: tuple[int, int, int],
    box: tuple[float, float, float, float],
    angle: float = 0.0,
) -> None:
    """Draw a filled, anti-aliased ``shape`` (one of SHAPES) in ``color_rgb`` into ``box`` = (x0, y0, x1, y1),
    rotated by ``angle`` degrees counter-clockwise about the box centre. Parts outside the image are clipped."""
    if shape not in _PARTS:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    side = max(2, round(size * 1.5))
    mask = _shape_mask(shape, side, angle)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.bitmap((round(cx - side / 2), round(cy - side / 2)), mask, fill=tuple(color_rgb))


def random_background(
    rng: np.random.Generator, size: int | tuple[int, int], brightness: tuple[float, float] = (60.0, 190.0)
) -> Image.Image:
    """A desaturated two-colour gradient in a random direction with pixel noise and a few faint lines;
    its mean grey level is drawn from ``brightness`` (0..255).

    Saturated COLORS stand out against it; nothing in it is a shape, so it carries no label information.
    """
    w, h = (size, size) if isinstance(size, int) else size
    base = rng.uniform(*brightness)
    c0, c1 = base + rng.uniform(-30, 30, 3), base + rng.uniform(-45, 45, 3)
    theta = rng.uniform(0, 2 * math.pi)
    # float32 and broadcasting throughout: this runs once per image in the DataLoader workers.
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.float32(math.cos(theta))
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * np.float32(math.sin(theta))
    t = (xs + ys + np.float32(0.5)).clip(0, 1)[..., None]
    img = c0.astype(np.float32) + t * (c1 - c0).astype(np.float32)
    # Pixel noise: uniform with a standard deviation of 3..14 grey levels (a quarter of the cost of Gaussian).
    img += (rng.random((h, w, 3), dtype=np.float32) - np.float32(0.5)) * np.float32(rng.uniform(3, 14) * math.sqrt(12))
    image = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        shade = int(base + rng.uniform(-25, 25))
        draw.line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))], fill=(shade,) * 3, width=1)
    return image


_SPLITS = {"train": 0, "val": 1}


class ShapesDataset(torch.utils.data.Dataset):
    """One coloured shape per image; the class is the shape (len(SHAPES) classes, balanced).

    Colour, size, position, rotation and background vary at random. Item ``i`` of ``split`` is drawn
    from a generator seeded by (seed, split, i), so the val split is a separate stream of images.
    Items are (uint8 CHW tensor, label).
    """

    class_names = SHAPES

    def __init__(self, split: str, image_size: int, num_items: int, seed: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
        if image_size < 16:
            raise UserError(f"data.image_size={image_size} is too small for shapes; use 16 or more")
        if num_items <= 0:
            raise UserError(f"data.num_{split}={num_items} must be positive")
        self.split, self.image_size, self.num_items, self.seed = split, image_size, num_items, seed

    def __len__(self) -> int:
        return self.num_items

    def draw(self, index: int) -> tuple[Image.Image, int]:
        """The PIL image and label of item ``index``."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        label = index % len(SHAPES)
        s = self.image_size
        # Dark backgrounds: every colour is brighter than its surroundings, which a linear patch embedding
        # picks up at once. (On backgrounds of any brightness vit-tiny reached 28% val top-1 after 77k
        # images instead of 71%.)
        image = random_background(rng, s, brightness=(15, 80))
        size = rng.uniform(0.35, 0.75) * s
        cx, cy = rng.uniform(size / 2, s - size / 2, 2)
        color = list(COLORS.values())[rng.integers(len(COLORS))]
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        draw_shape(ImageDraw.Draw(image), SHAPES[label], color, box, angle=rng.uniform(-20, 20))
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.draw(index)
        return to_tensor(image), label


def open_shapes(d: DictConfig, image_size: int) -> ImageClassData:
    """The ``data=shapes`` opener (abi_train.data.SOURCES): both splits drawn from data.seed."""
    train = ShapesDataset("train", image_size, int(d.num_train), int(d.seed))
    val = ShapesDataset("val", image_size, int(d.num_val), int(d.seed))
    return ImageClassData(train, val, list(ShapesDataset.class_names))
