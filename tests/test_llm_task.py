"""LLMTask on the real configs (recipe=llm composed by Hydra) with the tiny model and short windows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from abi_train.cli import config_dir
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.text import builtin_documents
from abi_train.data.tokenizer import Tokenizer
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.tasks.llm import SAMPLE_PROMPT, LLMTask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_token_shards  # noqa: E402


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm_cache")  # the built-in corpus is tokenized once per vocab size


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def make_cfg(cache: Path, *overrides: str) -> DictConfig:
    base = ["recipe=llm", "model=tiny", "data.seq_len=32", "trainer.batch_size=4", "trainer.eval_batches=2"]
    if "data=shards" not in overrides:
        base += ["data.vocab_size=512", f"data.cache_dir={cache}"]
    return compose_train(base + list(overrides))


def ready_task(cache: Path, *overrides: str, artifact_dir: Path | None = None) -> LLMTask:
    task = LLMTask(make_cfg(cache, *overrides), DistInfo())
    task.setup(artifact_dir)
    return task


def test_setup_batches_loss_and_artifacts(llm_cache: Path, tmp_path: Path) -> None:
    task = ready_task(llm_cache)
    config = task.model_config()
    assert config["arch"] == "gpt" and config["vocab_size"] == 512
    json.dumps(config)  # stored in checkpoints as JSON
    assert task.num_train_items() == (len(task.train_set.arrays[0]) - 1) // 32

    torch.manual_seed(0)
    model = build_model(config)
    x, y = next(iter(task.train_loader(GlobalBatchSampler(task.num_train_items(), 4, seed=0))))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert task.items_in((x, y)) == 128
    loss, logs = task.loss(model, (x, y))
    assert logs == {} and abs(loss.item() - math.log(512)) < 0.5  # near uniform at init
    assert model.flops_per_item() > 6 * sum(p.numel() for p in model.blocks.parameters())

    task.save_artifacts(tmp_path)
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint == task.tokenizer.fingerprint
    assert task.metadata() == {"tokenizer": {"bos_id": 0, "eos_id": 0, "pad_id": None}, "seq_len": 32}


def test_a_few_steps_lower_the_loss(llm_cache: Path) -> None:
    task = ready_task(llm_cache)
    torch.manual_seed(0)
    model = build_model(task.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = iter(task.train_loader(GlobalBatchSampler(task.num_train_items(), 4, seed=0)))
    first = None
    for _ in range(15):
        loss, _ = task.loss(model, next(batches))
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5


def test_evaluate_is_repeatable_and_leaves_rng_and_mode_alone(llm_cache: Path) -> None:
    task = ready_task(llm_cache)
    torch.manual_seed(0)
    model = build_model(task.model_config()).train()
    rng = torch.get_rng_state()
    first = task.evaluate(model, torch.device("cpu"))
    second = task.evaluate(model, torch.device("cpu"))
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert first == second
    assert set(first.scalars) == {"val/loss", "val/ppl"}
    assert first.scalars["val/ppl"] == pytest.approx(math.exp(first.scalars["val/loss"]))
    assert first.texts["samples/text"].startswith(SAMPLE_PROMPT) and len(first.texts["samples/text"]) > 40
    assert len(task._val_indices()) == 8  # eval_batches x batch_size fixed windows


def test_vocab_rounding_and_default_seq_len(llm_cache: Path) -> None:
    assert ready_task(llm_cache, "data.vocab_size=300").model_config()["vocab_size"] == 320
    cfg = compose_train(["recipe=llm", "model=tiny"])  # the yaml default follows the model's context
    assert cfg.data.seq_len == cfg.model.context_length == 128


def test_resume_uses_the_run_tokenizer(llm_cache: Path, tmp_path: Path) -> None:
    own = Tokenizer.train(builtin_documents()[:20], vocab_size=400)
    own.save(tmp_path / "tokenizer.json")
    task = ready_task(llm_cache, artifact_dir=tmp_path)
    assert task.tokenizer.fingerprint == own.fingerprint and task.model_config()["vocab_size"] == 448


def test_shards_through_the_task(llm_cache: Path, tmp_path: Path) -> None:
    docs = [{"text": d} for d in builtin_documents()[:30]]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    Tokenizer.train([d["text"] for d in docs], vocab_size=400).save(tmp_path / "tok.json")
    make_token_shards.main(
        ["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "s")]
        + ["--shard-tokens", "5000", "--val-fraction", "0.1", "--cache-dir", str(tmp_path / "cache")]
    )
    task = ready_task(llm_cache, "data=shards", f"data.path={tmp_path / 's'}", "data.seq_len=32")
    shards = task.train_set.arrays
    assert len(shards) > 1 and task.num_train_items() == sum((len(a) - 1) // 32 for a in shards)
    x, y = next(iter(task.train_loader(GlobalBatchSampler(task.num_train_items(), 4, seed=0))))
    assert x.shape == (4, 32) and int(x.max()) < 400


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.seq_len=256"], r"data.seq_len=256 is larger than model.context_length=128"),
        (["model.vocab_size=256"], r"the tokenizer has 512 tokens, more than model.vocab_size=256"),
        (["data.files={tmp}/empty.txt"], r"data.files: empty file"),
        (["data.files={tmp}/short.txt"], r"the training split has \d+ tokens, fewer than one window"),
        (
            ["data.files={tmp}/long.txt", "data.seq_len=4", "data.val_fraction=0.01"],
            r"the validation split has \d+ tokens, .* or a larger data.val_fraction",
        ),
        (["data=shards"], r"data=shards needs data.path"),
        (["data.val_fraction=1.5"], r"val_fraction must be between 0 and 1"),
    ],
)
def test_bad_inputs(llm_cache: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a few words")
    (tmp_path / "long.txt").write_text("a few words of text, " * 10)
    with pytest.raises(UserError, match=message):
        ready_task(llm_cache, *(o.format(tmp=tmp_path) for o in overrides))


def test_cli_bad_data_file_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "abi_train", "recipe=llm", "model=tiny", f"data.files={tmp_path / 'empty.jsonl'}"]
        + [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: data.files: empty file {tmp_path / 'empty.jsonl'}"
    assert not run_dir.exists()
