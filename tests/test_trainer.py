"""The shared trainer on the LLM recipe: exact resume, precisions, accumulation, non-finite skipping,
checkpoints, golden losses."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, compose_cfg, losses, read_metrics

from abi_train import checkpoint as ckpt
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.models.layers import pin_attention_kernel
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "llm_tiny_losses.json"


def train(tmp_path: Path, cache_dir: Path, overrides: list[str], name: str = "run") -> Path:
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", *overrides])
    run_dir = tmp_path / name
    task = task_class(cfg.task)(cfg, DistInfo())
    Trainer(cfg, task, run_dir, DistInfo()).fit()
    return run_dir


def test_exact_resume(tmp_path, cache_dir):
    """2N steps in one run == N steps + resume for N more: identical per-step losses (equality)."""
    full = train(tmp_path, cache_dir, ["trainer.max_steps=8"], "full")
    part = train(tmp_path, cache_dir, ["trainer.max_steps=8", "trainer.stop_at_step=4"], "part")
    cfg_resume = ["trainer.max_steps=8", "resume=true", "trainer.ckpt_every=4"]
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", *cfg_resume])
    Trainer(cfg, task_class("llm")(cfg, DistInfo()), part, DistInfo()).fit()
    assert losses(full) == losses(part)
    assert sorted(losses(part)) == list(range(1, 9))


def test_golden_losses(tmp_path, cache_dir):
    """Loss of the seeded tiny model after each of 4 steps matches the stored values."""
    got = losses(train(tmp_path, cache_dir, []))
    got = {str(k): v for k, v in got.items()}
    if os.environ.get("ABI_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1))
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    assert got["4"] < got["1"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precisions_train_on_cpu(tmp_path, cache_dir, precision):
    run = train(tmp_path, cache_dir, [f"trainer.precision={precision}", "trainer.max_steps=3"])
    rows = read_metrics(run)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    if precision == "fp16":
        assert "train/loss_scale" in rows[-1]


def sdpa_ops_run(model: torch.nn.Module, tokens: torch.Tensor) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(tokens).sum().backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_pin_reaches_the_kernel(compiled):
    """The pin holds inside torch.compile too (a context around the compiled call would not be traced)."""
    model = build_model({**compose_cfg(TINY_LLM).model, "vocab_size": 64})
    tokens = torch.randint(0, 64, (2, 16))
    for kind, kernel_op in [("flash", "aten::_scaled_dot_product_flash_attention_for_cpu"), ("math", None)]:
        pin_attention_kernel(model, kind)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        ops = sdpa_ops_run(run, tokens)
        if kernel_op:
            assert kernel_op in ops
        else:
            assert not any("flash" in op or "efficient" in op for op in ops)
        torch._dynamo.reset()


def assert_same_losses(tmp_path: Path, cache_dir: Path, first: list[str], second: list[str], rel: float) -> None:
    """Two runs that differ only in how they compute log the same per-step losses (within ``rel``)."""
    expected = losses(train(tmp_path, cache_dir, first, "first"))
    got = losses(train(tmp_path, cache_dir, second, "second"))
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=rel)


def test_attention_kernels_compute_the_same_losses(tmp_path, cache_dir):
    """trainer.attention pins the SDPA kernel; the plain-matmul kernel trains like PyTorch's pick."""
    steps = ["trainer.max_steps=3"]
    assert_same_losses(tmp_path, cache_dir, steps, [*steps, "trainer.attention=math"], rel=1e-5)


def test_bf16_residual_keeps_block_inputs_in_bf16(tmp_path, cache_dir):
    """Under bf16 autocast the blocks see a bf16 residual stream; the losses stay within bf16 noise."""
    cfg = compose_cfg(
        [*TINY_LLM, f"data.cache_dir={cache_dir}", "trainer.precision=bf16", "trainer.bf16_residual=true"]
    )
    trainer = Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "run", DistInfo())
    trainer.setup()
    seen = []
    trainer.raw_model.blocks[1].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    batch = next(trainer.batches)
    with trainer._autocast():
        trainer.task.loss(trainer.model, batch)
    assert seen == [torch.bfloat16]
    trainer.task.loss(trainer.model, batch)  # no autocast (fp32 run): the hook leaves the stream alone
    assert seen == [torch.bfloat16, torch.float32]
    plain = ["trainer.precision=bf16", "trainer.max_steps=3"]
    assert_same_losses(tmp_path, cache_dir, plain, [*plain, "trainer.bf16_residual=true"], rel=2e-2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.attention=fa3"], "trainer.attention='fa3' is not known"),
        (["trainer.bf16_residual=true"], "trainer.bf16_residual=true needs trainer.precision=bf16"),
    ],
)
def test_speed_options_reject_bad_values(tmp_path, cache_dir, overrides, message):
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", *overrides])
    with pytest.raises(UserError, match=message):
        Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "run", DistInfo())


def test_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    big, accumulated = ["trainer.batch_size=8"], ["trainer.batch_size=2", "trainer.global_batch_size=8"]
    assert_same_losses(tmp_path, cache_dir, big, accumulated, rel=1e-5)


def test_grad_clip_logs_preclip_norm(tmp_path, cache_dir):
    rows = read_metrics(train(tmp_path, cache_dir, ["trainer.grad_clip=1e-6", "trainer.max_steps=2"]))
    assert rows[0]["train/grad_norm"] > 1e-3  # the norm before clipping, not the clipped one


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, cache_dir, monkeypatch):
    cfg = compose_cfg(
        [*TINY_LLM, f"data.cache_dir={cache_dir}", "trainer.max_steps=6", "trainer.max_nonfinite_steps=3"]
    )
    task = task_class("llm")(cfg, DistInfo())
    real_loss = task.loss
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss, logs = real_loss(model, batch)
        return (loss * float("nan") if calls["n"] >= 2 else loss), logs

    monkeypatch.setattr(task, "loss", sometimes_nan)
    trainer = Trainer(cfg, task, tmp_path / "nan", DistInfo())
    with pytest.raises(UserError, match="3 steps in a row with a non-finite loss"):
        trainer.fit()
    assert trainer.nonfinite_total == 3
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())  # no NaN update applied


def test_checkpoints_keep_last_and_latest(tmp_path, cache_dir):
    run = train(tmp_path, cache_dir, ["trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_last=2"])
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((run / "checkpoints").glob(".tmp*"))
    step_dir = ckpt.resolve_checkpoint(run)
    assert {"model.safetensors", "meta.json", "train_state.pt", "tokenizer.json"} <= {
        p.name for p in step_dir.iterdir()
    }
    # weights_only loading of everything that is not safetensors
    state = torch.load(step_dir / "train_state.pt", weights_only=True)
    assert state["step"] == 6
    model, meta = ckpt.load_model(run)
    assert meta["family"] == "llm" and meta["step"] == 6


def test_init_from_loads_weights_not_state(tmp_path, cache_dir):
    first = train(tmp_path, cache_dir, ["trainer.max_steps=3", "trainer.ckpt_every=3"], "first")
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", f"init_from={first}", "trainer.max_steps=1"])
    trainer = Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "second", DistInfo())
    trainer.setup()
    trained, _ = ckpt.load_model(first)
    assert trainer.step == 0
    for (name, p), q in zip(trainer.raw_model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_with_other_model_shape_is_a_user_error(tmp_path, cache_dir):
    run = train(tmp_path, cache_dir, ["trainer.max_steps=2", "trainer.ckpt_every=2"])
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", "resume=true", "model.n_layer=3"])
    with pytest.raises(UserError, match="different model shape.*n_layer"):
        Trainer(cfg, task_class("llm")(cfg, DistInfo()), run, DistInfo()).setup()


class FakeStream:
    """Stands in for a CUDA stream on this CPU machine and logs what the prefetcher asks of streams."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name, self.device = log, name, "cuda:0"

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_prefetcher_copies_one_batch_ahead_on_a_side_stream(monkeypatch):
    """Batch n+1 is moved (on the side stream) as soon as batch n is handed out; the compute stream waits
    for the copy and keeps the memory alive; order and end of data are the loader's."""
    from abi_train.data import prefetch

    log: list = []
    side, compute = FakeStream(log, "side"), FakeStream(log, "compute")
    current = [compute]

    class StreamContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    monkeypatch.setattr(prefetch.torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(prefetch.torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(prefetch.torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(f"{int(t)} kept for {s.name}"))

    def move(batch: dict) -> dict:
        log.append(f"move {int(batch['x'])} on {current[-1].name}")
        return batch

    loader = iter([{"x": torch.tensor(i)} for i in range(3)])
    batches = prefetch.DevicePrefetcher(loader, move, torch.device("cuda"))
    assert log == []  # nothing drawn before the first step asks
    assert [int(b["x"]) for b in batches] == [0, 1, 2]
    assert log == [
        "move 0 on side",
        "compute waits for side",
        "0 kept for compute",
        "move 1 on side",
        "compute waits for side",
        "1 kept for compute",
        "move 2 on side",
        "compute waits for side",
        "2 kept for compute",
    ]
