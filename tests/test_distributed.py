"""Distributed training on CPU: 2 processes on Gloo (torchrun), the same numbers as one process.

The LLM runs below share one global batch of 4: one process with batch 4, and 2 processes (DDP and
FSDP2) with batch 1 and 2 micro-steps of accumulation each. Their per-step losses and gradient
norms must match; checkpoints from either resume on the other world size and wrapper and continue
the same loss curve; the consolidated weights export to the same GGUF.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_LLM, compose_cfg, losses, read_metrics
from gguf import GGUFReader
from omegaconf import OmegaConf
from safetensors import safe_open

from abi_train import checkpoint as ckpt
from abi_train.cli import config_dir
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import (
    DDPOptions,
    DistInfo,
    FSDPOptions,
    ddp_options,
    fsdp_options,
    full_state_dict,
    launch_overrides,
    resolve_parallel,
    shard_model,
    wrap_model,
)
from abi_train.errors import UserError
from abi_train.export import export_checkpoint
from abi_train.losses import clip_loss
from abi_train.models import build_model
from abi_train.tasks import task_class
from abi_train.trainer import Trainer

STEPS = 6  # checkpoints at steps 3 and 6; resumed runs continue from step 3
RUN = [*TINY_LLM, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=3", "trainer.device=cpu"]
TWO_PROCS_ACCUMULATING = ["trainer.batch_size=1", "trainer.global_batch_size=4"]  # 1 x 2 ranks x 2 micro-steps
# The DDP / FSDP2 levers of the multi-GPU runs (scripts/gpu_ddp.sh) change speed and memory, not the numbers.
LEVER_RUNS = {
    # static_graph refuses accumulation (a PyTorch bug): 2 ranks x batch 2 make the global batch of 4 here.
    "ddp_levers": ["trainer.parallel=ddp", "trainer.ddp.gradient_as_bucket_view=false", "trainer.ddp.static_graph=true",
                   "trainer.ddp.bucket_cap_mb=0.01", "trainer.batch_size=2"],
    "fsdp_zero2": [*TWO_PROCS_ACCUMULATING, "trainer.parallel=fsdp", "trainer.fsdp.reshard_after_forward=false"],
    "fsdp_prefetch": [*TWO_PROCS_ACCUMULATING, "trainer.parallel=fsdp", "trainer.fsdp.prefetch=2"],
}  # fmt: skip


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start `torchrun --nproc_per_node=2 -m abi_train args` (CPU, one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ABI_RUN_STAMP"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "abi_train"]
    return subprocess.Popen([*cmd, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    """Wait for a torchrun job; one still running after ``timeout`` s hangs: kill its process group, fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun job hung for {timeout} s: {proc.args}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_here(run_dir: Path, overrides: list[str]) -> None:
    """One process, in this interpreter (cheaper than a subprocess)."""
    cfg = compose_cfg(overrides)
    Trainer(cfg, task_class(cfg.task)(cfg, DistInfo()), run_dir, DistInfo()).fit()


def resumable_copy(run_dir: Path, step: int, dest: Path) -> Path:
    """A new run dir holding only ``run_dir``'s checkpoint of ``step`` (resume=true continues from it)."""
    name = ckpt.step_dir_name(step)
    shutil.copytree(run_dir / "checkpoints" / name, dest / "checkpoints" / name)
    (dest / "checkpoints" / "latest").write_text(name + "\n")
    return dest


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    torch.testing.assert_close(torch.tensor([got[s] for s in steps]), torch.tensor([want[s] for s in steps]),
                               rtol=1e-5, atol=0)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict:
    """Every run the tests below read, made once; independent torchrun jobs run side by side (most of
    their time is process start-up).

    one            1 process, batch 4: the reference; checkpoints at steps 3 and 6
    ddp, fsdp      2 processes x batch 1 x 2 micro-steps; ddp without hydra.run.dir (the default run dir)
    one_to_fsdp    one's step 3 resumed by 2 FSDP processes x batch 2
    bad_batch      a global batch of 6 that 2 processes x batch 2 cannot split
    ddp_levers     ddp with the non-default trainer.ddp values (no bucket views, static graph, tiny buckets)
    fsdp_zero2     fsdp with trainer.fsdp.reshard_after_forward=false (ZeRO-2 style)
    fsdp_prefetch  fsdp with explicit prefetching (trainer.fsdp.prefetch=2, more than the blocks there are)
    lora_*         adapter=lora on one's weights: 1 process, DDP and FSDP2 (its merged GGUF at the end)
    then fsdp's step 3 resumed by 2 DDP processes (fsdp_to_ddp) and by one process (fsdp_to_one).
    """
    root = tmp_path_factory.mktemp("dist")
    common = [*RUN, f"data.cache_dir={cache_dir}"]
    resume = [*common, "resume=true", "trainer.batch_size=2"]
    export = ["export=gguf", "export.outtype=f32"]  # model.gguf in the run dir at the end
    train_here(root / "one", [*common, *export])  # also fills the tokenizer cache the torchrun jobs read
    (root / "ddp_cwd").mkdir()
    one_to_fsdp = resumable_copy(root / "one", 3, root / "one_to_fsdp")
    lora = [*common, f"init_from={root / 'one'}", "adapter=lora", "adapter.rank=4", "optim.lr=1e-2"]
    train_here(root / "lora_one", lora)
    jobs = {
        "ddp": torchrun([*common, *TWO_PROCS_ACCUMULATING, "trainer.parallel=ddp"], root / "ddp_cwd"),
        "fsdp": torchrun([*common, *TWO_PROCS_ACCUMULATING, "trainer.parallel=fsdp", *export,
                          f"hydra.run.dir={root / 'fsdp'}"], root),
        "one_to_fsdp": torchrun([*resume, "trainer.parallel=fsdp", f"hydra.run.dir={one_to_fsdp}"], root),
        "bad_batch": torchrun([*common, "trainer.batch_size=2", "trainer.global_batch_size=6",
                               f"hydra.run.dir={root / 'bad'}"], root),
        **{name: torchrun([*common, *levers, f"hydra.run.dir={root / name}"], root)
           for name, levers in LEVER_RUNS.items()},
        "lora_ddp": torchrun([*lora, *TWO_PROCS_ACCUMULATING, "trainer.parallel=ddp",
                              f"hydra.run.dir={root / 'lora_ddp'}"], root),
        "lora_fsdp": torchrun([*lora, *TWO_PROCS_ACCUMULATING, "trainer.parallel=fsdp", *export,
                               "export.adapter=false", f"hydra.run.dir={root / 'lora_fsdp'}"], root),
    }  # fmt: skip
    done = {name: finish(proc) for name, proc in jobs.items()}
    for name in ("ddp", "fsdp", "one_to_fsdp", *LEVER_RUNS, "lora_ddp", "lora_fsdp"):
        assert done[name].returncode == 0, f"{name}: {done[name].stderr[-3000:]}"
    fsdp_to_ddp = resumable_copy(root / "fsdp", 3, root / "fsdp_to_ddp")
    job = torchrun([*resume, "trainer.parallel=ddp", f"hydra.run.dir={fsdp_to_ddp}"], root)
    fsdp_to_one = resumable_copy(root / "fsdp", 3, root / "fsdp_to_one")
    train_here(fsdp_to_one, [*resume, "trainer.batch_size=4"])
    resumed = finish(job)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (ddp_dir,) = (root / "ddp_cwd" / "runs" / "llm").iterdir()
    return {
        "one": root / "one",
        "ddp": ddp_dir,
        "fsdp": root / "fsdp",
        "resumed": [one_to_fsdp, fsdp_to_ddp, fsdp_to_one],
        "bad_batch": done["bad_batch"],
        "bad_dir": root / "bad",
        **{name: root / name for name in (*LEVER_RUNS, "lora_one", "lora_ddp", "lora_fsdp")},
    }


def test_ddp_and_fsdp_match_one_process(runs):
    one = read_metrics(runs["one"])
    for mode in ("ddp", "fsdp"):
        got = read_metrics(runs[mode])
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), mode
        for key, rtol in (("train/loss", 1e-5), ("train/grad_norm", 1e-4)):
            torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in one]),
                                       rtol=rtol, atol=0, msg=f"{mode} {key}")  # fmt: skip


def test_lora_under_ddp_and_fsdp_matches_one_process(runs):
    """The adapter trains to the same numbers and the same adapter file under DDP and FSDP2; FSDP2's merged
    GGUF (gathered, rebuilt with its LoRA layers, merged) exists."""
    one = read_metrics(runs["lora_one"])
    want = ckpt.read_state_dict(ckpt.latest_checkpoint(runs["lora_one"]) / ckpt.ADAPTER)
    for mode in ("lora_ddp", "lora_fsdp"):
        got = read_metrics(runs[mode])
        train = [r for r in got if "train/loss" in r]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1)), mode
        torch.testing.assert_close(torch.tensor([r["train/loss"] for r in train]),
                                   torch.tensor([r["train/loss"] for r in one if "train/loss" in r]),
                                   rtol=1e-5, atol=0, msg=mode)  # fmt: skip
        adapter = ckpt.read_state_dict(ckpt.latest_checkpoint(runs[mode]) / ckpt.ADAPTER)
        assert adapter.keys() == want.keys(), mode
        for name, tensor in want.items():
            torch.testing.assert_close(adapter[name], tensor, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")
    assert (runs["lora_fsdp"] / "model.gguf").is_file()


def test_ddp_and_fsdp_levers_keep_the_numbers(runs):
    """Each lever's run gives the one-process curve (as the default ddp/fsdp runs do), and ZeRO-2 style FSDP2
    the very losses of the ZeRO-3 default (the same reductions, only gathered at other times)."""
    one = read_metrics(runs["one"])
    for name in LEVER_RUNS:
        got = read_metrics(runs[name])
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), name
        for key, rtol in (("train/loss", 1e-5), ("train/grad_norm", 1e-4)):
            torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in one]),
                                       rtol=rtol, atol=0, msg=f"{name} {key}")  # fmt: skip
    zero3 = torch.tensor(list(losses(runs["fsdp"]).values()))
    for name in ("fsdp_zero2", "fsdp_prefetch"):
        torch.testing.assert_close(torch.tensor(list(losses(runs[name]).values())), zero3, rtol=1e-6, atol=0, msg=name)


def test_resume_across_world_sizes_and_wrappers(runs):
    """Step-3 checkpoints continue the reference curve: 1 -> 2 (FSDP), FSDP -> DDP, 2 (FSDP) -> 1."""
    want = losses(runs["one"])
    for run in runs["resumed"]:
        assert_same_curve(losses(run), want, range(4, STEPS + 1))


def test_one_run_dir_written_by_rank0_only(runs):
    run = runs["ddp"]
    assert {p.name for p in run.iterdir()} == {
        ".hydra", "checkpoints", "config.yaml", "metrics.jsonl", "tensorboard", "tokenizer.json",
        "tokenizer_config.json", "train.log",
    }  # fmt: skip
    assert len(read_metrics(run)) == STEPS  # one writer, not one per rank
    assert len(list((run / "tensorboard").iterdir())) == 1
    last = ckpt.latest_checkpoint(run)
    assert last is not None and last.name == ckpt.step_dir_name(STEPS)
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "train_state.pt"} <= {p.name for p in last.iterdir()}


def test_consolidated_weights_are_the_one_process_file(runs):
    """FSDP gathers whole tensors; the tied lm_head / tok_embd is stored once, as a single process does."""
    files = [runs[m] / "checkpoints" / ckpt.step_dir_name(STEPS) / "model.safetensors" for m in ("one", "fsdp")]
    one, fsdp = (safe_open(str(f), "pt") for f in files)
    names = set(one.keys())
    assert names == set(fsdp.keys()) and "tok_embd.weight" not in names
    assert one.metadata() == fsdp.metadata() == {"tok_embd.weight": "lm_head.weight"}
    for name in names:
        torch.testing.assert_close(fsdp.get_tensor(name), one.get_tensor(name), msg=name)


def test_gguf_from_two_processes_equals_one_process(runs, tmp_path):
    """The same GGUF from the one-process run, from the FSDP run's end-of-training export (weights
    gathered in memory) and from exporting the FSDP run's checkpoint (model.safetensors)."""
    one = GGUFReader(runs["one"] / "model.gguf")
    fields = {k: f.contents() for k, f in one.fields.items()}
    for path in (runs["fsdp"] / "model.gguf", export_checkpoint(runs["fsdp"], tmp_path / "fsdp.gguf", "f32")):
        two = GGUFReader(path)
        assert {k: f.contents() for k, f in two.fields.items()} == fields, path
        assert [t.name for t in two.tensors] == [t.name for t in one.tensors]
        for a, b in zip(one.tensors, two.tensors, strict=True):
            torch.testing.assert_close(torch.from_numpy(b.data.copy()), torch.from_numpy(a.data.copy()), msg=a.name)


def test_bad_global_batch_fails_once_without_hanging(runs):
    proc = runs["bad_batch"]  # finished within finish()'s timeout: no rank hung
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: trainer.global_batch_size=6 must be a positive multiple of trainer.batch_size x world size = 2 x 2 = 4"
    ], proc.stderr[-3000:]
    assert not runs["bad_dir"].exists()  # nothing left behind


# --- without processes ------------------------------------------------------------------------------
def test_ranks_read_disjoint_shards_of_the_global_batch():
    one = iter(GlobalBatchSampler(40, 8, seed=5))
    ranks = [iter(GlobalBatchSampler(40, 8, accumulation=2, rank=r, world_size=2, seed=5)) for r in range(2)]
    for _ in range(6):
        micro = [next(it) + next(it) for it in ranks]  # a rank's two micro-batches of one step
        assert not set(micro[0]) & set(micro[1])
        assert sorted(micro[0] + micro[1]) == sorted(next(one))


def test_parallel_modes():
    two = DistInfo(rank=0, local_rank=0, world_size=2)
    assert resolve_parallel("auto", two) == "ddp"
    assert resolve_parallel("fsdp", two) == "fsdp"
    assert resolve_parallel("fsdp", DistInfo()) == "none"  # one process: nothing to wrap
    with pytest.raises(UserError, match="separate models"):
        resolve_parallel("none", two)
    with pytest.raises(UserError, match="trainer.parallel='zero3'"):
        resolve_parallel("zero3", two)


def test_launch_overrides(monkeypatch):
    for key in ("ABI_RUN_STAMP", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_overrides(["recipe=llm"]) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    # Outside torchrun there is no store to agree on a timestamp through: ask for an explicit run dir.
    with pytest.raises(UserError, match="hydra.run.dir"):
        launch_overrides(["recipe=llm"])
    assert launch_overrides(["hydra.run.dir=/x"]) == ["hydra.output_subdir=null", "hydra/job_logging=none"]
    monkeypatch.setenv("RANK", "0")
    assert launch_overrides(["hydra.run.dir=/x"]) == []


def test_write_state_dict_is_byte_identical_to_save_model(tmp_path):
    torch.manual_seed(0)
    model = build_model({"arch": "gpt", "vocab_size": 64, "n_layer": 1, "d_model": 32, "n_head": 2})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt.write_weights(tmp_path / "a", model)
    state = model.state_dict()
    assert state["lm_head.weight"] is not state["tok_embd.weight"]  # state_dict() detaches: re-tie as FSDP's path does
    state["lm_head.weight"] = state["tok_embd.weight"]
    ckpt.write_state_dict(tmp_path / "b", state)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_fsdp_refuses_scalar_parameters_clearly():
    model = torch.nn.Linear(4, 4)
    model.register_parameter("temperature", torch.nn.Parameter(torch.tensor(1.0)))
    with pytest.raises(UserError, match="temperature.*trainer.parallel=ddp"):
        shard_model(model, "fp32", torch.device("cpu"))


def test_clip_has_no_scalar_parameters_so_fsdp_can_shard_it():
    model = _clip_model()
    assert all(p.ndim >= 1 for p in model.parameters())


# --- CLIP: DDP + gather-with-grad == one process on the concatenated batch ------------------------
def _clip_model() -> torch.nn.Module:
    cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "clip-tiny.yaml"))
    torch.manual_seed(0)
    return build_model({**cfg, "vocab_size": 64, "eot_id": 63})


def _clip_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 64, (8, 32), generator=gen)


def _clip_grads(call: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Loss and parameter gradients of one step; ``call`` is ``model`` or its DDP wrapper."""
    img, txt, scale, _ = call(images, tokens)
    loss = clip_loss(img, txt, scale)
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def _clip_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _clip_model()
        ddp = wrap_model(model, OmegaConf.create({"parallel": "ddp"}), DistInfo(rank, rank, world), torch.device("cpu"))
        images, tokens = _clip_batch()
        local = slice(rank * 4, (rank + 1) * 4)
        torch.save(_clip_grads(ddp, model, images[local], tokens[local]), f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_ddp_two_processes_equal_one_batch_of_twice_the_size(tmp_path):
    mp.spawn(_clip_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _clip_model()
    want = _clip_grads(model, model, *_clip_batch())
    torch.testing.assert_close((ranks[0].pop("loss") + ranks[1].pop("loss")) / 2, want.pop("loss"))
    assert ranks[0].keys() == want.keys()
    for name in want:  # DDP already averaged the gradients: every rank holds the big batch's
        torch.testing.assert_close(ranks[0][name], want[name], msg=name)
        torch.testing.assert_close(ranks[1][name], want[name], msg=name)


# --- evaluation: split across 2 ranks (Gloo), the numbers of one process ----------------------------
EVAL_COMMON = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.log_every=1", "trainer.ckpt_every=0",
               "trainer.progress=false", "trainer.num_workers=0", "optim.warmup_steps=1"]  # fmt: skip
# Odd val sets: the ranks' shares differ by one item, so the padding and the extra forward calls are exercised.
EVAL_FAMILIES = {
    "llm": [*TINY_LLM, "trainer.eval_batches=3"],
    "vit": ["recipe=vit", "model=vit-tiny", "data.num_train=32", "data.num_val=13", "trainer.eval_batches=4"],
    "clip": ["recipe=clip", "model=clip-tiny", "data.num_train=32", "data.num_val=13", "data.num_zero_shot=11"],
}


def _eval_overrides(family: str, cache_dir: Path, batch_size: int) -> list[str]:
    cache = [f"data.cache_dir={cache_dir}"] if family == "llm" else []
    return [*EVAL_FAMILIES[family], *EVAL_COMMON, *cache, "trainer.device=cpu", f"trainer.batch_size={batch_size}"]


# FSDP2 gathers weights inside every forward: a rank with one eval batch fewer would leave the other waiting.
EVAL_PARALLEL = {"llm": "ddp", "vit": "fsdp", "clip": "fsdp"}


def _eval_worker(rank: int, world: int, init_file: str, root: str, cache_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A collective that waits this long fails the test instead of hanging it.
    timeout = datetime.timedelta(seconds=90)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        for family in EVAL_FAMILIES:
            overrides = [*_eval_overrides(family, Path(cache_dir), 2), f"trainer.parallel={EVAL_PARALLEL[family]}"]
            train_here_on(Path(root) / family, overrides, DistInfo(rank, rank, world))
    finally:
        dist.destroy_process_group()


def train_here_on(run_dir: Path, overrides: list[str], info: DistInfo) -> None:
    cfg = compose_cfg(overrides)
    Trainer(cfg, task_class(cfg.task)(cfg, info), run_dir, info).fit()


def test_evaluation_on_two_processes_equals_one_process(tmp_path, cache_dir):
    """Every family's validation scalars (and train logs) from 2 Gloo processes x batch 2 (DDP; FSDP2 for
    ViT and CLIP) equal one process x batch 4: the ranks split the val items, reduce sums and gather CLIP's
    embeddings for retrieval, with as many forward calls on each rank."""
    for family in EVAL_FAMILIES:  # one process first: it also fills the LLM's tokenizer cache
        train_here_on(tmp_path / "one" / family, _eval_overrides(family, cache_dir, 4), DistInfo())
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), str(cache_dir)), nprocs=2)
    for family in EVAL_FAMILIES:
        one, two = (read_metrics(tmp_path / n / family) for n in ("one", "two"))
        val_one = {k: v for row in one for k, v in row.items() if k.startswith("val/")}
        val_two = {k: v for row in two for k, v in row.items() if k.startswith("val/")}
        assert "val/loss" in val_one and val_one.keys() == val_two.keys(), family
        if family == "clip":
            assert {"val/i2t_r@1", "val/t2i_r@10", "val/zero_shot_top1"} <= val_one.keys()
        for key in val_one:
            assert val_two[key] == pytest.approx(val_one[key], rel=1e-5, abs=1e-6), f"{family} {key}"
        for key in ("train/loss", "train/logit_scale", "train/top1"):
            if key in one[-1]:
                assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-5), f"{family} {key}"


# --- a non-finite loss on one rank only: every rank skips that step (no collective decides it) -----------
NAN_STEP = 2


def _nan_worker(rank: int, world: int, init_file: str, root: str, cache_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))  # fmt: skip
    try:
        for parallel in ("ddp", "fsdp"):
            info = DistInfo(rank, rank, world)
            cfg = compose_cfg([*TINY_LLM, f"data.cache_dir={cache_dir}", "trainer.device=cpu",
                               f"trainer.parallel={parallel}", "trainer.log_every=2"])  # fmt: skip
            task = task_class(cfg.task)(cfg, info)
            real_loss, calls = task.loss, {"n": 0}

            def nan_on_rank1(model, batch, real_loss=real_loss, calls=calls):
                calls["n"] += 1
                loss, logs = real_loss(model, batch)
                return (loss * float("nan") if rank == 1 and calls["n"] == NAN_STEP else loss), logs

            task.loss = nan_on_rank1
            trainer = Trainer(cfg, task, Path(root) / parallel, info)
            trainer.fit()
            local = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
                     for n, p in trainer.raw_model.named_parameters()}  # fmt: skip
            torch.save({
                "skipped": trainer.nonfinite.total,
                "adam_steps": sorted({int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}),
                "local": local,  # DDP: the whole weights; FSDP2: this rank's shards
                "full": full_state_dict(trainer.raw_model),  # collective: rank 0 gets the whole weights
            }, Path(root) / f"{parallel}{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_nonfinite_loss_on_one_rank_is_skipped_on_all(tmp_path, cache_dir):
    """Rank 1 alone gets a NaN loss at step 2 (DDP, then FSDP2): DDP's averaged gradients carry it to rank 0,
    so the verdict from the synced gradient norm is the same on both: step 2 skipped everywhere, AdamW stepped
    3 times of 4, DDP's weights equal across ranks, FSDP2's gathered weights equal DDP's, logged losses finite."""
    train_here(tmp_path / "tokenizer_cache", [*TINY_LLM, f"data.cache_dir={cache_dir}", "trainer.max_steps=1"])
    mp.spawn(_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(cache_dir)), nprocs=2)
    ranks = {(par, r): torch.load(tmp_path / f"{par}{r}.pt") for par in ("ddp", "fsdp") for r in range(2)}
    for (par, r), got in ranks.items():
        assert got["skipped"] == 1 and got["adam_steps"] == [3], (par, r)
    ddp = ranks["ddp", 0]["local"]
    assert all(torch.isfinite(p).all() for p in ddp.values())
    for name, weight in ddp.items():
        assert torch.equal(ranks["ddp", 1]["local"][name], weight), name
        torch.testing.assert_close(ranks["fsdp", 0]["full"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    for par in ("ddp", "fsdp"):
        logged = read_metrics(tmp_path / par)
        assert [r["step"] for r in logged] == [2, 4]
        assert all(math.isfinite(r["train/loss"]) for r in logged) and logged[-1]["train/nonfinite_steps"] == 1


def test_ddp_and_fsdp_options_are_checked():
    assert ddp_options(None) == DDPOptions()
    assert ddp_options({"bucket_cap_mb": 100, "static_graph": True}) == DDPOptions(bucket_cap_mb=100, static_graph=True)
    assert fsdp_options({"reshard_after_forward": False}) == FSDPOptions(reshard_after_forward=False)
    bad = [
        (ddp_options, {"bucket_mb": 5}, r"trainer.ddp.bucket_mb is not known; valid: bucket_cap_mb, "),
        (ddp_options, {"bucket_cap_mb": 0}, r"trainer.ddp.bucket_cap_mb=0 must be > 0"),
        (ddp_options, {"static_graph": "yes"}, r"trainer.ddp.static_graph='yes' must be true or false"),
        (ddp_options, {"optimize": "python_reducer"}, r"trainer.ddp.optimize='python_reducer' is not known"),
        (fsdp_options, {"prefetch": -1}, r"trainer.fsdp.prefetch=-1 must be an integer >= 0"),
        (fsdp_options, {"prefetch": 1.5}, r"trainer.fsdp.prefetch=1.5 must be an integer"),
        (fsdp_options, {"reshard_after_forward": 1}, r"trainer.fsdp.reshard_after_forward=1 must be true or false"),
    ]
    for read, given, message in bad:
        with pytest.raises(UserError, match=message):
            read(given)
    two = DistInfo(rank=0, local_rank=0, world_size=2)
    static = {"parallel": "ddp", "ddp": {"static_graph": True}, "batch_size": 1, "global_batch_size": 4}
    with pytest.raises(UserError, match=r"trainer.ddp.static_graph=true does not work with gradient accumulation"):
        wrap_model(torch.nn.Linear(2, 2), OmegaConf.create(static), two, torch.device("cpu"))
    with pytest.raises(UserError, match="trainer.fsdp.prefetch=-1"):  # checked whatever trainer.parallel says
        wrap_model(torch.nn.Linear(2, 2), OmegaConf.create({"parallel": "auto", "fsdp": {"prefetch": -1}}), DistInfo(),
                   torch.device("cpu"))  # fmt: skip
