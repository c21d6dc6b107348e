"""The data registry (abi_train.data): the data group picks the source and says which family it feeds;
each task refuses another family's data in one line, before it reads any data.KEY."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import compose_cfg, run_abi

from abi_train.cli import config_dir
from abi_train.data import SOURCES, CaptionData, ImageClassData, TokenData, data_source, open_data, sources_for
from abi_train.data.synthetic import ShapesDataset
from abi_train.data.synthetic_pairs import TEMPLATES, SyntheticZeroShot
from abi_train.data.text import load_text_data
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.tasks import task_class

FEEDS = {
    "text": "llm",
    "shards": "llm",
    "shapes": "vit",
    "images": "vit",
    "captions": "clip",
    "pairs": "clip",
    "chat": "sft",
}
TAKES = {
    "llm": "recipe=llm takes data=text or data=shards",
    "vit": "recipe=vit takes data=shapes or data=images",
    "clip": "recipe=clip takes data=captions or data=pairs",
    "sft": "recipe=sft takes data=chat",
}
NOT = {
    "llm": "data={} is not LLM data",
    "vit": "data={} is not an image dataset",
    "clip": "data={} is not caption data",
    "sft": "data={} is not chat data",
}


def setup_task(overrides: list[str]) -> None:
    cfg = compose_cfg(overrides)
    task_class(cfg.task)(cfg, DistInfo()).setup(None)


def test_every_shipped_data_group_is_registered_with_its_family() -> None:
    groups = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(config_dir()) / "data").glob("*.yaml")}
    assert {name: g["name"] for name, g in groups.items()} == {name: name for name in groups}
    assert {name: s.family for name, s in SOURCES.items()} == FEEDS and set(groups) == set(FEEDS)
    for family in TAKES:
        assert sources_for(family) == [n for n, f in FEEDS.items() if f == family]
    with pytest.raises(ValueError, match="unknown task family 'gpt'"):
        sources_for("gpt")


@pytest.mark.parametrize("recipe, data", [(r, d) for r in TAKES for d, family in FEEDS.items() if family != r])
def test_a_task_refuses_another_familys_data_in_one_line(recipe: str, data: str) -> None:
    expected = f"{NOT[recipe].format(data)}: it feeds {FEEDS[data]} runs; {TAKES[recipe]}"
    with pytest.raises(UserError) as e:
        setup_task([f"recipe={recipe}", f"data={data}"])
    assert str(e.value) == expected


@pytest.mark.parametrize("recipe", ["llm", "vit", "clip"])
def test_unknown_or_missing_data_name(recipe: str) -> None:
    with pytest.raises(UserError) as e:
        setup_task([f"recipe={recipe}", "data.name=nope"])
    assert str(e.value) == f"data.name='nope' is not a known data source; {TAKES[recipe]}"
    with pytest.raises(UserError) as e:
        setup_task([f"recipe={recipe}", "~data.name"])
    assert str(e.value) == f"data.name is not set; {TAKES[recipe]}"


def test_cli_wrong_family_is_one_line_exit_2_and_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_abi(["recipe=vit", "data=text", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == f"error: {NOT['vit'].format('text')}: it feeds llm runs; {TAKES['vit']}"
    )
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_openers_return_their_familys_data() -> None:
    """What the tasks used to build inline, now from the openers (the same items)."""
    d = compose_cfg(["recipe=vit", "data.num_train=24", "data.num_val=12", "data.seed=5"]).data
    shapes = open_data(d, "vit", image_size=32)
    assert isinstance(shapes, ImageClassData) and shapes.class_names == list(ShapesDataset.class_names)
    assert (len(shapes.train), len(shapes.val)) == (24, 12)
    direct = ShapesDataset("val", 32, 12, seed=5)
    assert torch.equal(shapes.val[7][0], direct[7][0]) and shapes.val[7][1] == direct[7][1]

    for hold_out in (True, False):
        overrides = ["recipe=clip", "data.num_train=8", "data.num_val=4", "data.num_zero_shot=96"]
        d = compose_cfg([*overrides, f"data.hold_out={str(hold_out).lower()}"]).data
        pairs = data_source(d, "clip").open(d, image_size=32)
        assert isinstance(pairs, CaptionData) and len(pairs.class_names) == 96 == len(pairs.zero_shot)
        assert pairs.held_out == (set(SyntheticZeroShot.held_out_classes) if hold_out else set())
        assert len(pairs.train.captions()) == 8 and pairs.templates == TEMPLATES


def test_text_opener_matches_load_text_data(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    overrides = [f"data.files={tmp_path / 'a.txt'}", f"data.cache_dir={tmp_path / 'c'}", "data.vocab_size=300"]
    d = compose_cfg(["recipe=llm", *overrides]).data
    tokens = open_data(d, "llm", tokenizer=None)
    ref = load_text_data(str(tmp_path / "a.txt"), "text", 0.05, None, 300, tmp_path / "c")
    assert isinstance(tokens, TokenData) and len(tokens.train) == len(tokens.val) == 1
    assert np.array_equal(tokens.train[0], ref.train) and np.array_equal(tokens.val[0], ref.val)
    assert tokens.tokenizer.fingerprint == ref.tokenizer.fingerprint
    with pytest.raises(UserError, match=r"^data=shards needs data.path=DIR"):
        open_data(compose_cfg(["recipe=llm", "data=shards"]).data, "llm", tokenizer=None)
