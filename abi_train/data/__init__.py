"""The data registry: the ``data`` group picks the source, not an ``if d.name == ...`` inside each task.

``SOURCES`` maps a data group's ``name`` (``configs/data/<name>.yaml``) to the task family it feeds and the
``"module:function"`` that opens it. A task asks once, at the top of ``setup``, whether the group suits it
(``data_source(cfg.data, family)``: one line naming the group, the family it does feed and the groups this
one takes), and later opens it (``.open(cfg.data, ...)``, or ``open_data`` for both at once). Openers live
next to the data they open and return their family's data:

  llm   ``opener(d, tokenizer=Tokenizer | None) -> TokenData``        (train/val token arrays + tokenizer)
  vit   ``opener(d, image_size=int) -> ImageClassData``               (train/val datasets + class names)
  clip  ``opener(d, image_size=int) -> CaptionData``                  (pairs, zero-shot set, classes, templates)
  sft   ``opener(d, tokenizer=Tokenizer | None) -> data.sft.ChatData``  (labelled conversations; recipe=sft)

Openers are named by string so that opening text never imports Pillow or ``datasets`` (and the data
modules can import the result types from here without a cycle).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abi_train.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from omegaconf import DictConfig
    from torch.utils.data import Dataset

    from abi_train.data.tokenizer import Tokenizer


# --- what each family's openers return ------------------------------------------------------------
@dataclass
class TokenData:
    """LLM data: token arrays per split (each a flat id array; windows never cross two arrays)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    tokenizer: Tokenizer


@dataclass
class ImageClassData:
    """ViT data: (uint8 CHW image, label) datasets; an unreadable image is a None item."""

    train: Dataset
    val: Dataset
    class_names: list[str]


@dataclass
class CaptionData:
    """CLIP data: (uint8 CHW image, caption) pairs (``train`` has ``.captions()`` for tokenizer training),
    and for zero-shot evaluation (image, class index) items, the class names, the prompt templates and the
    class indices held out of training."""

    train: Dataset
    val: Dataset
    zero_shot: Dataset | None
    class_names: list[str]
    templates: list[str]
    held_out: set[int] = field(default_factory=set)


# --- the registry ----------------------------------------------------------------------------------
# How a wrong-family error opens, per family: the wording each task used before the registry, which the
# task tests match (tests/test_clip_task.py matches the quoted "data='text'", test_vit_task the unquoted one).
NOT_FAMILY_DATA = {
    "llm": "data={name} is not LLM data",
    "vit": "data={name} is not an image dataset",
    "clip": "data={name} is not caption data",
    "sft": "data={name} is not chat data",
}


@dataclass(frozen=True)
class DataSource:
    name: str  # the data group's ``name`` key
    family: str  # the task family it feeds: llm | vit | clip
    opener: str  # "module:function"

    def open(self, d: DictConfig, **kwargs: Any) -> Any:
        """The opener's result (TokenData | ImageClassData | CaptionData, by family)."""
        module, function = self.opener.split(":")
        opener: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return opener(d, **kwargs)


SOURCES: dict[str, DataSource] = {
    s.name: s
    for s in (
        DataSource("text", "llm", "abi_train.data.text:open_text"),
        DataSource("shards", "llm", "abi_train.data.tokens:open_shards"),
        DataSource("shapes", "vit", "abi_train.data.synthetic:open_shapes"),
        DataSource("images", "vit", "abi_train.data.images:open_images"),
        DataSource("captions", "clip", "abi_train.data.synthetic_pairs:open_captions"),
        DataSource("pairs", "clip", "abi_train.data.pairs:open_pairs"),
        # Chat SFT trains the same GPT as "llm" (its Task.family is "llm") but reads conversations, not a
        # token stream, so its data is a family of its own here: recipe=llm data=chat is one line, not a crash.
        DataSource("chat", "sft", "abi_train.data.sft:open_chat"),
    )
}


def sources_for(family: str) -> list[str]:
    """The data group names that feed ``family``, in registry order."""
    if family not in NOT_FAMILY_DATA:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(NOT_FAMILY_DATA)}")
    return [name for name, s in SOURCES.items() if s.family == family]


def data_source(d: DictConfig, family: str) -> DataSource:
    """The registry entry of data group ``d`` if it feeds ``family``, else one UserError line."""
    takes = f"recipe={family} takes " + " or ".join(f"data={n}" for n in sources_for(family))
    name = d.get("name")
    source = SOURCES.get(name) if isinstance(name, str) else None
    if source is None:
        what = "data.name is not set" if name is None else f"data.name={name!r} is not a known data source"
        raise UserError(f"{what}; {takes}")
    if source.family != family:
        not_ours = NOT_FAMILY_DATA[family].format(name=name)
        raise UserError(f"{not_ours}: it feeds {source.family} runs; {takes}")
    return source


def open_data(d: DictConfig, family: str, **kwargs: Any) -> Any:
    """Check that data group ``d`` feeds ``family`` and open it (kwargs: see the module docstring)."""
    return data_source(d, family).open(d, **kwargs)
