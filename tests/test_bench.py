"""The benchmark command on a tiny model (CPU), and the trainer's sync-free non-finite skip that the GPU uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, compose_cfg, run_abi

from abi_train import bench
from abi_train.data.prefetch import batch_tensors
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

TINY_BENCH = ["recipe=llm", "model=tiny", "data.seq_len=32", "data.vocab_size=512", "trainer.batch_size=2"]


def test_bench_prints_one_json_record(tmp_path, cache_dir):
    args = [*TINY_BENCH, f"data.cache_dir={cache_dir}", "trainer.device=cpu", "bench.steps=3", "bench.warmup=1"]
    result = run_abi(args, module="abi_train.bench", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["recipe"] == "llm" and record["model"] == "tiny" and record["card"] == "cpu"
    assert record["batch"] == 2 and record["seq_len"] == 32 and record["shapes"] == [[2, 32], [2, 32]]
    assert record["tokens_per_s"] > 0 and record["step_ms"] > 0 and record["steps"] == 3
    assert record["mfu"] is None and record["peak_memory_gb"] is None  # no GPU: no peak FLOPs, no CUDA memory
    assert len(record["losses"]) == 3 and all(0 < x < 20 for x in record["losses"])
    assert not list(tmp_path.iterdir())  # no run dir, no outputs folder


def test_bench_option_errors():
    with pytest.raises(UserError, match="unknown bench option"):
        bench.split_overrides(["bench.stepz=3"])
    with pytest.raises(UserError, match="expected a int"):
        bench.split_overrides(["bench.steps=many"])
    with pytest.raises(UserError, match="bench.steps must be >= 1"):
        bench.split_overrides(["bench.steps=0"])
    overrides, options = bench.split_overrides(["model=tiny", "bench.steps=5"])
    assert overrides == ["model=tiny"] and options["steps"] == 5 and options["warmup"] == 10


def test_bench_script_is_the_bench_command(tmp_path):
    """``python scripts/bench.py`` (the issue's spelling) runs the same command, user errors included."""
    script = Path(__file__).parent.parent / "scripts" / "bench.py"
    result = subprocess.run(
        [sys.executable, str(script), "bench.stepz=3"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown bench option 'bench.stepz=3'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# Each recipe's tiny debug size, with a small data set where the default one is large.
RECIPES = {
    "llm": ["model=tiny", "data.seq_len=32", "data.vocab_size=512"],  # + data.cache_dir: the session cache
    "clip": ["model=clip-tiny", "data.num_train=64", "data.num_val=16", "data.num_zero_shot=16"],
    "vit": ["model=vit-tiny", "data.num_train=64", "data.num_val=16", "trainer.num_workers=0"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_synthetic_batch_matches_the_loader(recipe, cache_dir):
    """The bench's batch has the structure, shapes and dtypes of a real micro-batch of the recipe."""
    cache = [f"data.cache_dir={cache_dir}"] if recipe == "llm" else []
    cfg = compose_cfg([f"recipe={recipe}", *RECIPES[recipe], "trainer.batch_size=3", *cache])
    task = task_class(cfg.task)(cfg, DistInfo())
    task.setup(None)
    real = next(iter(task.train_loader(GlobalBatchSampler(task.num_train_items(), 3))))
    fake = task.synthetic_batch(3)
    assert type(fake) is type(real)
    if isinstance(real, dict):
        assert fake.keys() == real.keys()
    real_t, fake_t = batch_tensors(real), batch_tensors(fake)
    assert [(t.shape, t.dtype) for t in fake_t] == [(t.shape, t.dtype) for t in real_t]
    assert task.items_in(fake) == task.items_in(real)
    if recipe == "llm":
        x, y = fake
        assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < task.vocab_size  # next-token pairs


def test_device_side_skip_without_host_sync(tmp_path, cache_dir, monkeypatch):
    """A non-finite update is skipped inside fused AdamW (found_inf) and counted later (the optimizer is fused
    on CPUs too, so the GPU's path is checked here): same skips, same stop, no NaN in the weights."""
    cfg = compose_cfg(
        [
            *TINY_LLM,
            f"data.cache_dir={cache_dir}",
            "trainer.max_steps=8",
            "trainer.max_nonfinite_steps=3",
            "trainer.log_every=4",
        ]
    )
    task = task_class("llm")(cfg, DistInfo())
    real_loss, calls = task.loss, {"n": 0}

    def nan_at_2_and_from_4(model, batch):
        calls["n"] += 1
        loss, logs = real_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss), logs

    monkeypatch.setattr(task, "loss", nan_at_2_and_from_4)
    trainer = Trainer(cfg, task, tmp_path / "run", DistInfo())
    with pytest.raises(UserError, match=r"3 steps in a row with a non-finite loss or gradient \(last at step 6\)"):
        trainer.fit()
    assert trainer.nonfinite.on_device
    assert trainer.nonfinite.total == 4  # step 2, then 4, 5, 6
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    # The stop comes at the log step 8 (the next host sync); of the 8 steps only 1 and 3 were applied, and a
    # skipped step leaves AdamW's step count alone.
    assert trainer.step == 8
    assert {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {2}
