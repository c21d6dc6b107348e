"""The shared trainer on the LLM recipe: exact resume, precisions, accumulation, non-finite skipping,
checkpoints, golden losses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLM, compose_cfg, losses

from abi_train import checkpoint as ckpt
from abi_train import sources
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
    """2N steps in one run == N steps + resume for N more: identical per-step losses (equality). The split
    run is the same command twice with resume=auto: the first finds no checkpoint and starts fresh."""
    full = train(tmp_path, cache_dir, ["trainer.max_steps=8"], "full")
    same_command = ["trainer.max_steps=8", "trainer.stop_at_step=4", "resume=auto"]
    part = train(tmp_path, cache_dir, same_command, "part")
    assert sorted(losses(part)) == [1, 2, 3, 4]
    cfg_resume = ["trainer.max_steps=8", "resume=auto", "trainer.ckpt_every=4"]
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", *cfg_resume])
    Trainer(cfg, task_class("llm")(cfg, DistInfo()), part, DistInfo()).fit()
    assert losses(full) == losses(part)
    assert sorted(losses(part)) == list(range(1, 9))


@pytest.mark.parametrize(
    ("value", "message"), [("true", "holds no checkpoint"), ("maybe", "resume='maybe' is not known")]
)
def test_resume_needs_a_checkpoint_or_a_known_mode(tmp_path, cache_dir, value, message):
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", f"resume={value}"])
    with pytest.raises(UserError, match=message):
        Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "empty", DistInfo()).setup()


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


def setup_trainer(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> Trainer:
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", *overrides])
    trainer = Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "run", DistInfo())
    trainer.setup()
    return trainer


def weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.raw_model.parameters()])


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_precision_is_in_effect_inside_the_step(tmp_path, cache_dir, precision, dtype):
    """The step's matmuls run in the asked dtype (autocast is on inside train_step), the master weights stay
    fp32 and the losses finite."""
    trainer = setup_trainer(tmp_path, cache_dir, [f"trainer.precision={precision}"])
    seen = []
    trainer.raw_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    out = [trainer.train_step(trainer.batches) for _ in range(2)]
    assert seen == [dtype, dtype]
    assert all(torch.isfinite(o.loss) for o in out) and out[0].finite and out[1].finite
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())


def test_fp16_grad_scaler_skips_an_overflow_and_backs_off(tmp_path, cache_dir, monkeypatch):
    """fp16: a step whose scaled gradients overflow fp16 leaves the weights alone and halves the loss scale;
    it is the GradScaler's business, not a non-finite step."""
    trainer = setup_trainer(tmp_path, cache_dir, ["trainer.precision=fp16"])
    scale = trainer.scaler.get_scale()
    trainer.train_step(trainer.batches)
    assert trainer.scaler.get_scale() == scale  # a normal step: applied, scale unchanged
    before = weights(trainer)
    real_loss = trainer.task.loss
    # A finite loss whose scaled gradient (1e4 x 65536 / tokens) overflows fp16's 65504 inside the backward.
    monkeypatch.setattr(trainer.task, "loss", lambda model, batch: (real_loss(model, batch)[0] * 1e4, {}))
    out = trainer.train_step(trainer.batches)
    assert torch.isfinite(out.loss) and out.finite
    assert trainer.scaler.get_scale() == scale / 2
    assert torch.equal(weights(trainer), before)
    assert trainer.nonfinite.total == 0


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
    with trainer.autocast():
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


def first_update(tmp_path: Path, cache_dir: Path, grad_clip: float) -> tuple[float, float, float]:
    """(logged pre-clip norm, norm of the gradients the optimizer applied, norm of the weight update) of
    step 1 from the seeded initial weights."""
    trainer = setup_trainer(tmp_path, cache_dir, [f"trainer.grad_clip={grad_clip}", "optim.weight_decay=0"])
    applied = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: applied.append(
            float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.params if p.grad is not None])
                )
            )
        )  # fmt: skip
    )
    before = weights(trainer)
    out = trainer.train_step(trainer.batches)
    return float(out.grad_norm), applied[0], float(torch.linalg.vector_norm(weights(trainer) - before))


def test_grad_clip_clips_the_applied_update_and_logs_the_preclip_norm(tmp_path, cache_dir):
    norm, applied, update = first_update(tmp_path, cache_dir, 0.0)
    clipped_norm, clipped_applied, clipped_update = first_update(tmp_path, cache_dir, 1e-6)
    assert clipped_norm == pytest.approx(norm, rel=1e-5) and norm > 1e-3  # logged: the norm before clipping
    assert applied == pytest.approx(norm, rel=1e-5)  # no clipping: the optimizer gets the raw gradients
    assert clipped_applied == pytest.approx(1e-6, rel=1e-3)  # clipped to grad_clip
    # AdamW normalises by its second moment, so the update shrinks only where eps dominates: much smaller
    # gradients, a clearly smaller update than the unclipped run's.
    assert clipped_update < 0.5 * update


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
    assert trainer.nonfinite.total == 3
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
    model, meta = sources.load_model(run)
    assert meta["family"] == "llm" and meta["step"] == 6


def test_init_from_loads_weights_not_state(tmp_path, cache_dir):
    first = train(tmp_path, cache_dir, ["trainer.max_steps=3", "trainer.ckpt_every=3"], "first")
    cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", f"init_from={first}", "trainer.max_steps=1"])
    trainer = Trainer(cfg, task_class("llm")(cfg, DistInfo()), tmp_path / "second", DistInfo())
    trainer.setup()
    trained, _ = sources.load_model(first)
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
