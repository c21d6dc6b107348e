"""Every shipped config composes and runs one training step (and one evaluation).

The config tree is walked from disk, so a new option file is covered without touching this test.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import compose_cfg
from PIL import Image

from abi_train.cli import config_dir
from abi_train.data import SOURCES
from abi_train.distributed import DistInfo
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

CONFIGS = config_dir()
RECIPE_OF_ARCH = {"gpt": "llm", "vit": "vit", "clip": "clip"}
# The recipe that takes each data group: the family it feeds (tests/test_data_registry.py checks the registry).
RECIPE_OF_DATA = {name: source.family for name, source in SOURCES.items()}
# One small step per recipe: the shipped sizes stay as they are (that is what is being checked),
# only batch, data and cadence shrink.
FAST = [
    "trainer.max_steps=1",
    "trainer.batch_size=2",
    "trainer.eval_every=1",
    "trainer.eval_batches=1",
    "trainer.ckpt_every=1",
    "trainer.log_every=1",
    "trainer.num_workers=0",
    "trainer.progress=false",
]
FAST_DATA = {
    "llm": ["data.seq_len=16"],
    "vit": [],
    "clip": [],
    "sft": ["data.seq_len=64", "data.reply_tokens=2", "data.samples=1"],
}
FAST_DATA_OPTION = {
    "text": ["data.vocab_size=300"],
    "shards": [],
    "shapes": ["data.num_train=8", "data.num_val=4"],
    "images": [],
    "captions": ["data.num_train=8", "data.num_val=4", "data.num_zero_shot=4"],
    "pairs": ["data.val_size=2"],
    "chat": [],
}
DEFAULT_DATA = {"llm": "text", "vit": "shapes", "clip": "captions"}
# Shapes too big for one CPU step in CI (weights, gradients and AdamW state of 1.24B parameters are ~20 GB):
# one block at its shipped width and the tokenizer's vocabulary; test_llama_1b_is_llama_3_2_1b (and
# tests/test_phi3.py for phi4-mini, test_real_shape_is_the_public_model for others) checks the whole shape
# without allocating it.
SHRUNK = ["model.n_layer=1", "model.vocab_size=null"]
SHRUNK_MODELS = {name: SHRUNK for name in ("llama-1b", "phi4-mini", "qwen3-0.6b", "mistral-7b")}
SHRUNK_MODELS["smollm3-3b"] = [*SHRUNK, "model.nope_layers=null"]  # its NoPE layers 3, 7, ... are gone too
for _name in ("gemma3-1b", "gemma2-2b"):  # the one block left slides
    SHRUNK_MODELS[_name] = [*SHRUNK, "model.layer_types=[sliding]"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def test_every_group_is_walked():
    assert {"model", "optim", "data", "trainer", "logger", "export", "recipe"} <= set(groups())
    assert set(options("recipe")) == {"llm", "vit", "clip", "sft"}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, list[str]]:
    """Small real-data inputs for the data options that need files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = root / "images"
    for cls in ("cat", "dog"):
        (images / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, path in enumerate(sorted(images.rglob("*.png"))):
            w.writerow([str(path.relative_to(root)), f"a photo of a {path.parent.name} number {i}"])
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}." for i in range(3000)))
    cfg = compose_cfg(["recipe=llm", "data.vocab_size=300", f"data.files={corpus}", f"data.cache_dir={root / 'c'}"])
    from abi_train.data.tokenizer import Tokenizer

    tok = Tokenizer.train([corpus.read_text()], vocab_size=cfg.data.vocab_size)
    tok.save(root / "tok.json")
    import subprocess
    import sys

    shards = root / "shards"
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_token_shards.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--input",
            str(corpus),
            "--tokenizer",
            str(root / "tok.json"),
            "--out",
            str(shards),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        "text": [f"data.files={corpus}", f"data.cache_dir={root / 'c'}"],
        "shards": [f"data.path={shards}"],
        "images": [f"data.path={images}", "data.val_fraction=0.25"],
        "pairs": [f"data.path={root / 'pairs.csv'}"],
    }


def run_one_step(tmp_path: Path, overrides: list[str]) -> dict[str, float]:
    cfg = compose_cfg(overrides)
    task = task_class(cfg.task)(cfg, DistInfo())
    summary = Trainer(cfg, task, tmp_path / "run", DistInfo()).fit()
    assert math.isfinite(summary["train/loss"])
    if cfg.trainer.ckpt_every:
        assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    return summary


def recipe_overrides(recipe: str, data: str, data_files: dict) -> list[str]:
    return [
        f"recipe={recipe}",
        f"data={data}",
        *FAST,
        *FAST_DATA[recipe],
        *FAST_DATA_OPTION[data],
        *data_files.get(data, []),
    ]


@pytest.mark.parametrize("model", options("model"))
def test_model_option_runs_a_step(tmp_path, data_files, model):
    arch = yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text())["arch"]
    recipe = RECIPE_OF_ARCH[arch]
    # The shipped sizes as they are; evaluation and checkpoints are covered by the other tests (at full
    # size they only cost minutes of CPU).
    run_one_step(
        tmp_path,
        [
            *recipe_overrides(recipe, DEFAULT_DATA[recipe], data_files),
            f"model={model}",
            "trainer.eval_every=0",
            "trainer.ckpt_every=0",
            *SHRUNK_MODELS.get(model, []),
        ],
    )


def test_llama_1b_is_llama_3_2_1b():
    """configs/model/llama-1b.yaml is Llama-3.2-1B: as many parameters as transformers' Llama built from Meta's
    config (1,235,814,400; both on the meta device: nothing allocated), GQA's shape and its RoPE frequencies."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from abi_train.models import build_model
    from abi_train.models.layers import rope_frequencies

    cfg = yaml.safe_load((CONFIGS / "model" / "llama-1b.yaml").read_text())
    meta = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})  # fmt: skip
    with torch.device("meta"):
        ours, theirs = build_model(cfg), LlamaForCausalLM(meta)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights once; q/k/v fused here)
    assert count(ours) == count(theirs) == 1_235_814_400
    assert ours.blocks[0].attn.qkv.weight.shape == (2048 + 2 * 512, 2048)  # 32 query heads, 8 kv heads of 64
    assert ours.rope.shape == (2, 131072, 64)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](meta, "cpu")
    torch.testing.assert_close(rope_frequencies(64, cfg["rope_theta"], cfg["rope_scaling"]), want.float())


# model YAML -> (transformers class prefix, or the config's and the model's, the public model's config.json shape,
# its parameters)
REAL_SHAPES = {
    "qwen3-0.6b": (
        "Qwen3",
        {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True},
        596_049_920,
    ),
    "smollm3-3b": (
        "SmolLM3",
        {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
         "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 65536,
         "rms_norm_eps": 1e-6, "rope_theta": 5e6, "tie_word_embeddings": True, "no_rope_layer_interval": 4},
        3_075_098_624,
    ),
    "mistral-7b": (
        "Mistral",
        {"vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False},
        7_248_023_552,
    ),
    "gemma3-1b": (
        ("Gemma3Text", "Gemma3"),  # Gemma3ForCausalLM takes a Gemma3TextConfig
        {"vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
         "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 256,
         "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": None},
        999_885_952,
    ),
    "gemma2-2b": (
        "Gemma2",
        {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-6, "rope_theta": 1e4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
        2_614_341_888,
    ),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(REAL_SHAPES))
def test_real_shape_is_the_public_model(model):
    """A real-shape model YAML reads back from the public model's config.json as itself (every key the HF import
    maps) and has its parameter count, on the meta device (nothing allocated)."""
    import torch
    import transformers

    from abi_train.models import build_model
    from abi_train.models.families import family
    from abi_train.models.gpt import GPTConfig

    kind, shape, params = REAL_SHAPES[model]
    config_kind, model_kind = kind if isinstance(kind, tuple) else (kind, kind)
    cfg = yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text())
    config = getattr(transformers, f"{config_kind}Config")(**shape)
    mapped = family(cfg["style"]).config_from_hf(config.to_dict(), "config.json")
    assert GPTConfig(**mapped, style=cfg["style"], name=model) == GPTConfig(
        **{k: v for k, v in cfg.items() if k != "arch"}
    )
    with torch.device("meta"):
        ours, theirs = build_model(cfg), getattr(transformers, f"{model_kind}ForCausalLM")(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == params


@pytest.mark.parametrize("data", options("data"))
def test_data_option_runs_a_step(tmp_path, data_files, data):
    recipe = RECIPE_OF_DATA[data]
    run_one_step(tmp_path, recipe_overrides(recipe, data, data_files))


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in groups() if g not in ("model", "data", "recipe") for o in options(g)],
)
def test_other_options_run_a_step(tmp_path, data_files, group, option):
    common = [*recipe_overrides("llm", "text", data_files), "model=tiny"]
    base = []
    if group == "adapter" and option != "none":  # an adapter adapts a pretrained model: a one-step run's
        run_one_step(tmp_path / "base", common)
        base = [f"init_from={tmp_path / 'base' / 'run'}"]
    run_one_step(tmp_path, [*common, *base, f"{group}={option}"])


@pytest.mark.parametrize("recipe", options("recipe"))
def test_recipe_defaults_compose_and_step(tmp_path, data_files, recipe):
    """Each recipe as shipped (its own model and data), shrunk only in steps/batch/data size."""
    cfg = compose_cfg([f"recipe={recipe}"])
    assert cfg.task == recipe
    data = cfg.data.name
    run_one_step(
        tmp_path, [f"recipe={recipe}", *FAST, *FAST_DATA[recipe], *FAST_DATA_OPTION[data], *data_files.get(data, [])]
    )
