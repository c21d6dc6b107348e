"""Procedurally generated image-caption pairs: CLIP's offline default data.

A scene is one or two coloured shapes; its caption says what is where, e.g.
"a drawing of a small red circle above a blue star.". Everything comes from a generator seeded by
(seed, split, index), so an item is the same on every machine and epoch, and no files are needed.

Held out: one colour per shape (``HELD_OUT``) never appears in training scenes. Validation and
zero-shot scenes use every combination, so zero-shot accuracy on the held-out ones measures whether
the model composes "red" and "star" it has only seen apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import ImageDraw

from abi_train.data import CaptionData
from abi_train.data.synthetic import COLORS, SHAPES, draw_shape, random_background
from abi_train.errors import UserError

COLOR_NAMES = list(COLORS)
# Zero-shot classes: every colour + shape ("red circle"), colour-major.
COMBOS = [(c, s) for c in COLOR_NAMES for s in SHAPES]
CLASS_NAMES = [f"{c} {s}" for c, s in COMBOS]
# Shape i is never drawn in colour (3i + 1) mod 8 during training: each shape loses one colour.
HELD_OUT = {(COLOR_NAMES[(3 * i + 1) % len(COLOR_NAMES)], s) for i, s in enumerate(SHAPES)}
# Zero-shot prompts; the same framings appear in training captions, so their words are known.
TEMPLATES = ["a photo of {}.", "a drawing of {}.", "a picture of {}.", "{}."]
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}
# Side of a shape as a fraction of the image: alone, or as one of two (each in its own half). Large enough
# that a shape spans several 8 px patches of a 32 px image (smaller ones: zero-shot top-1 0.22, mostly colour).
SIZES = {1: {"small": (0.42, 0.56), "large": (0.62, 0.8)}, 2: {"small": (0.28, 0.34), "large": (0.38, 0.44)}}
# Fraction of training and validation scenes with one shape (zero-shot images always have one).
ONE_SHAPE = 0.75
# Mean grey level of the backgrounds: dark, so every colour is brighter than its surroundings.
BRIGHTNESS = (15.0, 80.0)
_SPLITS = {"train": 0, "val": 1, "zero_shot": 2}


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: str  # "small" | "large"
    say_size: bool  # whether the caption names the size

    def phrase(self) -> str:
        words = [self.size] if self.say_size else []
        return with_article(" ".join([*words, self.color, self.shape]))


def _things(rng: np.random.Generator, combos: list[tuple[str, str]], count: int) -> list[Thing]:
    """``count`` shapes, each a random (colour, shape) from ``combos`` with a random size."""
    things = []
    for _ in range(count):
        color, shape = combos[rng.integers(len(combos))]
        things.append(Thing(color, shape, size=("small", "large")[rng.integers(2)], say_size=rng.random() < 0.5))
    return things


def _render(rng: np.random.Generator, size: int, things: list[Thing], relation: str | None) -> torch.Tensor:
    """Draw the scene on a random background: uint8 (3, size, size)."""
    image = random_background(rng, size, brightness=BRIGHTNESS)
    draw = ImageDraw.Draw(image)
    halves = [rng.uniform(*SIZES[len(things)][t.size]) / 2 for t in things]
    if relation is None:
        # Anywhere the whole box fits.
        centres = [rng.uniform(halves[0], 1 - halves[0], 2) * size]
    else:
        # The first shape sits in the half the relation names, the second in the opposite half;
        # both share a random position on the other axis. Two large shapes still do not overlap.
        dx, dy = RELATIONS[relation]
        other = rng.uniform(0.3, 0.7)

        def centre(sign: int) -> np.ndarray:
            x = 0.5 + 0.25 * sign * dx if dx else other
            y = 0.5 + 0.25 * sign * dy if dy else other
            return (np.array([x, y]) + rng.uniform(-0.03, 0.03, 2)) * size

        centres = [centre(1), centre(-1)]
    for t, half, (cx, cy) in zip(things, halves, centres, strict=True):
        half *= size
        box = (cx - half, cy - half, cx + half, cy + half)
        draw_shape(draw, t.shape, COLORS[t.color], box, angle=rng.uniform(-15, 15))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _check(split: str, image_size: int, num_items: int) -> None:
    if image_size < 16:
        raise UserError(f"model.image_size={image_size} is too small for caption scenes; use 16 or more")
    if num_items <= 0:
        raise UserError(f"data.num_{split}={num_items} must be positive")


class SyntheticPairs(torch.utils.data.Dataset):
    """Captioned scenes of one or two shapes; items are (uint8 CHW tensor, caption).

    Item ``i`` of ``split`` ("train" | "val") is drawn from a generator seeded by (seed, split, i).
    With ``hold_out``, training scenes never contain a HELD_OUT combination.
    """

    def __init__(self, split: str, image_size: int, num_items: int, seed: int = 0, hold_out: bool = True) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; valid: train, val")
        _check(split, image_size, num_items)
        self.split, self.image_size, self.num_items, self.seed = split, image_size, num_items, seed
        self.combos = [c for c in COMBOS if not (hold_out and split == "train" and c in HELD_OUT)]

    def __len__(self) -> int:
        return self.num_items

    def _scene(self, index: int) -> tuple[np.random.Generator, list[Thing], str | None, str]:
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        things = _things(rng, self.combos, 1 if rng.random() < ONE_SHAPE else 2)
        relation = list(RELATIONS)[rng.integers(len(RELATIONS))] if len(things) == 2 else None
        desc = things[0].phrase() if relation is None else f"{things[0].phrase()} {relation} {things[1].phrase()}"
        return rng, things, relation, TEMPLATES[rng.integers(len(TEMPLATES))].format(desc)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` without drawing it (tokenizer training reads all of them)."""
        return self._scene(index)[3]

    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        rng, things, relation, caption = self._scene(index)
        return _render(rng, self.image_size, things, relation), caption


class SyntheticZeroShot(torch.utils.data.Dataset):
    """One-shape scenes for zero-shot classification; items are (uint8 CHW tensor, class index into
    CLASS_NAMES). Labels cycle through every class, held-out ones included."""

    class_names = CLASS_NAMES
    templates = TEMPLATES
    held_out_classes = sorted(COMBOS.index(c) for c in HELD_OUT)

    def __init__(self, image_size: int, num_items: int, seed: int = 0) -> None:
        _check("zero_shot", image_size, num_items)
        self.image_size, self.num_items, self.seed = image_size, num_items, seed

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, _SPLITS["zero_shot"], index])
        label = index % len(COMBOS)
        return _render(rng, self.image_size, _things(rng, [COMBOS[label]], 1), None), label


def open_captions(d: DictConfig, image_size: int) -> CaptionData:
    """The ``data=captions`` opener (abi_train.data.SOURCES): generated pairs and zero-shot scenes over
    every colour+shape class; with data.hold_out, the HELD_OUT ones are kept out of training."""
    seed, hold_out = int(d.seed), bool(d.hold_out)
    return CaptionData(
        train=SyntheticPairs("train", image_size, int(d.num_train), seed, hold_out=hold_out),
        val=SyntheticPairs("val", image_size, int(d.num_val), seed),
        zero_shot=SyntheticZeroShot(image_size, int(d.num_zero_shot), seed),
        class_names=list(CLASS_NAMES),
        templates=list(TEMPLATES),
        held_out=set(SyntheticZeroShot.held_out_classes) if hold_out else set(),
    )
