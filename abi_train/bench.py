"""Benchmark of the training step: ``python -m abi_train.bench recipe=llm model=gpt2-124m trainer.batch_size=32
data.seq_len=1024 trainer.precision=bf16 trainer.compile=true [bench.steps=30 bench.warmup=10]``.

Times the real training step of a recipe: the config is composed as a run composes it (no run dir), the Task
and the Trainer are built by ``Trainer.setup()``, only the data is swapped for one synthetic batch already on
the device. After warm-up (compilation) it times ``Trainer.train_step`` and prints one JSON line: step time
(median), throughput, MFU against the card's bf16 peak, peak memory. Under torchrun every rank steps, rank 0
prints. Options of the bench itself (not of the run config):

    bench.steps=30      timed steps (the median of these is reported)
    bench.warmup=10     untimed steps first (compilation, autotuning, allocator warm-up)
    bench.compile_mode=default   torch.compile mode when trainer.compile=true (e.g. max-autotune-no-cudagraphs)
    bench.profile=FILE  after timing, profile 3 more steps and write the kernel table (by GPU time) to FILE

With ``adapter=lora`` and no ``init_from``, the adapter adapts the randomly initialised model: the LoRA step costs
the same on random weights.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from abi_train.data.prefetch import batch_tensors
from abi_train.errors import UserError

BENCH_DEFAULTS: dict[str, Any] = {
    "steps": 30,
    "warmup": 10,
    "compile_mode": "default",
    "profile": "",
}


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate ``bench.key=value`` options from the run's Hydra overrides."""
    overrides, options = [], dict(BENCH_DEFAULTS)
    for arg in argv:
        if not arg.startswith("bench."):
            overrides.append(arg)
            continue
        key, _, value = arg[len("bench.") :].partition("=")
        if key not in BENCH_DEFAULTS:
            raise UserError(f"unknown bench option {arg!r}; valid: {', '.join('bench.' + k for k in BENCH_DEFAULTS)}")
        try:
            options[key] = type(BENCH_DEFAULTS[key])(value)
        except ValueError:
            raise UserError(f"{arg!r}: expected a {type(BENCH_DEFAULTS[key]).__name__}") from None
    if options["steps"] < 1 or options["warmup"] < 0:
        raise UserError(f"bench.steps must be >= 1 and bench.warmup >= 0, got {options['steps']}, {options['warmup']}")
    return overrides, options


def compose(overrides: list[str]) -> DictConfig:
    """The run config exactly as ``python -m abi_train`` composes it, without creating a run dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from abi_train.cli import config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides)
    except HydraException as e:
        raise UserError(str(e).splitlines()[0]) from None


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Run ``step`` warmup + steps times; per-step times (CUDA events on GPUs) and the peak memory of the
    timed steps. Returns step_ms (median), step_ms_wall (mean over the whole timed loop) and the outputs."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    outputs, times = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            events[i][0].record()
        else:
            t = time.perf_counter()
        outputs.append(step())
        if cuda:
            events[i][1].record()
        else:
            times.append((time.perf_counter() - t) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    wall = (time.perf_counter() - t0) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"step_ms": statistics.median(times), "step_ms_wall": wall, "peak_memory_gb": peak, "outputs": outputs}


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def report(
    device: torch.device, unit: str, items_per_step: int, flops_per_item: float, timing: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The JSON record shared by this bench and the reference scripts (scripts/gpu_reference.py)."""
    from abi_train.metrics import peak_flops

    rate = items_per_step / (timing["step_ms"] / 1e3)
    peak = peak_flops(device)
    return {
        **fields,
        "card": card_name(device),
        "torch": torch.__version__,
        "step_ms": round(timing["step_ms"], 3),
        "step_ms_wall": round(timing["step_ms_wall"], 3),
        f"{unit}_per_s": round(rate, 1),
        "mfu": round(flops_per_item * rate / peak, 4) if peak else None,
        "peak_memory_gb": round(timing["peak_memory_gb"], 3) if timing["peak_memory_gb"] is not None else None,
    }


def run_bench(overrides: list[str], options: dict[str, Any]) -> dict[str, Any] | None:
    """Build the run's Trainer, time its train_step on one synthetic batch; the record (None on ranks > 0)."""
    from abi_train.distributed import all_reduce_mean, dist_info_from_env, init_distributed
    from abi_train.tasks import task_class
    from abi_train.trainer import Trainer

    cfg = compose(overrides)
    dist = dist_info_from_env()
    init_distributed(dist, str(cfg.trainer.device))
    with tempfile.TemporaryDirectory() as run_dir:  # setup() writes nothing; a run dir is still required
        task = task_class(cfg.task)(cfg, dist)
        trainer = Trainer(cfg, task, run_dir, dist)
        trainer.setup(random_base=True)
    if cfg.trainer.compile and options["compile_mode"] != "default":
        trainer.model = torch.compile(unwrap_compile(trainer.model), mode=options["compile_mode"])
    batch = task.to_device(task.synthetic_batch(cfg.trainer.batch_size), trainer.device)
    trainer.batches = itertools.repeat(batch)
    trainer.model.train()
    step = lambda: trainer.train_step(trainer.batches)
    timing = time_steps(step, options["steps"], options["warmup"], trainer.device)
    if options["profile"]:
        write_profile(step, options["profile"], trainer.device)
    losses = torch.stack([out.loss for out in timing["outputs"]])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        losses = all_reduce_mean(losses)  # each rank's own losses: the global batch's are their mean
        torch.distributed.destroy_process_group()
    if not dist.is_main:
        return None
    sizes = {"seq_len": cfg.data.get("seq_len"), "image_size": trainer.model_config.get("image_size")}
    record = report(
        trainer.device,
        task.unit,
        timing["outputs"][0].items,  # this rank's items in one optimizer step
        trainer.raw_model.flops_per_item(),
        timing,
        recipe=overrides_value(overrides, "recipe") or cfg.task,
        model=overrides_value(overrides, "model") or cfg.model.get("name"),
        batch=cfg.trainer.batch_size,
        **{k: v for k, v in sizes.items() if v is not None},
        shapes=[list(t.shape) for t in batch_tensors(batch)],
        precision=cfg.trainer.precision,
        compile=bool(cfg.trainer.compile),
        compile_mode=options["compile_mode"] if cfg.trainer.compile else None,
        adapter=None if trainer.adapter is None else trainer.adapter.to_dict(),
        trainable_params=sum(p.numel() for p in trainer.params),
        attention=cfg.trainer.attention,
        bf16_residual=bool(cfg.trainer.bf16_residual),
        world_size=dist.world_size,
        parallel=cfg.trainer.parallel if dist.world_size > 1 else "none",
        ddp=OmegaConf.to_container(cfg.trainer.ddp) if dist.world_size > 1 else None,
        fsdp=OmegaConf.to_container(cfg.trainer.fsdp) if dist.world_size > 1 else None,
        steps=options["steps"],
        losses=[round(float(loss), 5) for loss in losses[:5]],
        loss_last=round(float(losses[-1]), 5),
    )
    if dist.world_size > 1:  # per-GPU numbers above; the job's total here
        record[f"{task.unit}_per_s_job"] = round(record[f"{task.unit}_per_s"] * dist.world_size, 1)
    return record


def write_profile(step: Callable[[], Any], path: str, device: torch.device, steps: int = 3) -> None:
    """Kernel time table of ``steps`` calls of ``step`` (torch.profiler), sorted by device (CPU runs: CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    order = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=order, row_limit=60, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(f"{steps} steps\n{table}\n")


def unwrap_compile(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def overrides_value(overrides: list[str], key: str) -> str | None:
    for arg in overrides:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return None


HELP = f"""usage: python -m abi_train.bench [bench.KEY=VALUE ...] [run overrides as for python -m abi_train ...]

{(__doc__ or "").partition(chr(10) * 2)[2].strip()}

Example (GPT-2 124M, bf16, compiled, on one GPU):
    python -m abi_train.bench recipe=llm model=gpt2-124m data.seq_len=1024 trainer.batch_size=32 \\
        trainer.precision=bf16 trainer.compile=true trainer.device=cuda bench.steps=30"""


def main(argv: list[str] | None = None) -> None:
    from abi_train.cli import run_cli

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(HELP)
        return
    overrides, options = run_cli(lambda: split_overrides(argv))
    record = run_cli(lambda: run_bench(overrides, options))
    if record is not None:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
