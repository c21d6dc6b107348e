"""The one training loop shared by every recipe.

Accumulation, precision, clipping, non-finite skipping, the optimizer and schedule, evaluation cadence,
logging, checkpointing, resume and distributed wrapping are written here once; what differs per model
family (batch -> loss, metrics, evaluation) comes from a Task (abi_train/tasks).

Reading order: ``Trainer.setup`` (model, then ``_setup_optimization``, then ``_batches``), ``train_step`` (one
optimizer step), ``fit`` (``_start_run``, the loop with ``_log`` / ``_evaluate_and_log`` / ``save_checkpoint``,
``_finish``). ``NonFiniteGuard`` holds the skip-and-stop logic for non-finite steps, ``LogWindow`` what a
train log line averages.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from abi_train import checkpoint as ckpt
from abi_train import transforms
from abi_train.data.prefetch import DevicePrefetcher
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    clip_grad_norm_,
    full_model,
    full_optimizer_state_dict,
    full_state_dict,
    grad_sync,
    load_optimizer_state_dict,
    wrap_model,
)
from abi_train.errors import UserError
from abi_train.lora import trainable_state
from abi_train.metrics import MetricsLogger, Progress, peak_flops
from abi_train.models import build_model
from abi_train.models.layers import ATTENTION_KERNELS, pin_attention_kernel
from abi_train.optim import build_optimizer, build_scheduler
from abi_train.sources import load_pretrained
from abi_train.tasks.base import EvalResult, Task
from abi_train.transforms import Transforms
from abi_train.utils import pick_device, rng_state, seed_everything, set_rng_state
from abi_train.weights import base_identity, load_pretrained_weights


@dataclass
class StepOutput:
    loss: torch.Tensor  # this rank's mean loss of the step (device tensor, not synced, not averaged over ranks)
    grad_norm: torch.Tensor  # global grad norm before clipping
    finite: bool | torch.Tensor  # False: the update was skipped (a device bool when decided on the GPU)
    logs: dict[str, torch.Tensor]  # the task's extra tensors from the last micro-batch
    items: int  # tokens / images / pairs processed


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_residual_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the input of every transformer block to ``dtype`` while autocast is on, so the residual stream
    between blocks is stored and added in bf16 instead of float32 (Megatron's default; FSDP2 mixed precision
    does the same): about half the bytes for the memory-bound kernels around each block."""
    from abi_train.models.layers import Block

    def cast_input(module: torch.nn.Module, args: tuple) -> tuple | None:
        x, *rest = args
        if not torch.is_autocast_enabled(x.device.type) or x.dtype == dtype:
            return None
        return (x.to(dtype), *rest)

    for module in model.modules():
        if isinstance(module, Block):
            module.register_forward_pre_hook(cast_input)


def accumulation_steps(batch_size: int, global_batch_size: int | None, world_size: int) -> int:
    """Micro-steps per optimizer step so that batch_size x world_size x accumulation == global batch."""
    if batch_size is None or batch_size <= 0:
        raise UserError(f"trainer.batch_size={batch_size} must be a positive integer")
    if global_batch_size is None:
        return 1
    per_micro_step = batch_size * world_size
    if global_batch_size <= 0 or global_batch_size % per_micro_step:
        raise UserError(
            f"trainer.global_batch_size={global_batch_size} must be a positive multiple of "
            f"trainer.batch_size x world size = {batch_size} x {world_size} = {per_micro_step}"
        )
    return global_batch_size // per_micro_step


def check_trainer_options(tc: DictConfig) -> None:
    """UserError for a trainer.* value the loop cannot run with (before anything is built)."""
    if tc.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={tc.precision!r} is not known; valid: {', '.join(PRECISIONS)}")
    if tc.max_steps is None or tc.max_steps <= 0:
        raise UserError(f"trainer.max_steps={tc.max_steps} must be a positive integer")
    for key in ("log_every", "eval_every", "ckpt_every"):
        if tc[key] is None or tc[key] < 0:
            raise UserError(f"trainer.{key}={tc[key]} must be >= 0")
    if tc.attention not in ATTENTION_KERNELS:
        raise UserError(f"trainer.attention={tc.attention!r} is not known; valid: {', '.join(ATTENTION_KERNELS)}")
    if tc.attention == "flex" and not str(tc.device).startswith(("cuda", "auto")):
        raise UserError(f"trainer.attention=flex needs CUDA (flex_attention has no backward on {tc.device}); use auto")
    if tc.bf16_residual and tc.precision != "bf16":
        raise UserError(f"trainer.bf16_residual=true needs trainer.precision=bf16, got {tc.precision!r}")


class NonFiniteGuard:
    """Skips updates whose loss or gradient is not finite, counts them and stops a diverged run.

    ``check`` decides on the device; ``record`` queues the verdict of a step; ``settle`` brings the queued
    verdicts to the host (one sync for any number of steps), counts them and raises UserError after
    ``max_streak`` skips in a row. ``on_device``: fused AdamW skips the update itself where ``found_inf``
    is set, so the loop need not sync every step (fp16 and FSDP's DTensor parameters keep the host path).
    fp16 gradient overflow is the GradScaler's business, not a divergence: only the loss is checked then.
    """

    def __init__(self, max_streak: int, on_device: bool, check_grads: bool) -> None:
        self.max_streak, self.on_device, self.check_grads = max_streak, on_device, check_grads
        self.total = 0  # skipped steps over the whole run (saved in checkpoints)
        self.streak = 0  # skipped steps in a row, up to the last settled one
        self._queued: list[tuple[int, bool | torch.Tensor]] = []  # (step, finite) not yet counted
        self._unreported: list[int] = []

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The step's verdict, the same on every rank without a collective of its own.

        With gradients checked, the synchronised gradient norm alone decides: it is one number on every rank
        (DDP averaged the gradients, FSDP2 reduced the norm), and a non-finite loss on any rank makes every
        rank's gradients non-finite through that averaging. ``loss`` must then be this rank's own: its
        finiteness is not rank-consistent. fp16 checks only the loss, which must be the global one.
        """
        return torch.isfinite(grad_norm) if self.check_grads else torch.isfinite(loss)

    def record(self, step: int, finite: bool | torch.Tensor) -> None:
        self._queued.append((step, finite))

    @property
    def queued(self) -> int:
        return len(self._queued)

    def settle(self) -> None:
        """Count the queued verdicts; UserError once ``max_streak`` steps in a row were skipped."""
        if not self._queued:
            return
        steps = [step for step, _ in self._queued]
        flags = torch.stack([torch.as_tensor(f) for _, f in self._queued]).tolist()  # the one host sync
        self._queued = []
        for step, finite in zip(steps, flags, strict=True):
            if finite:
                self.streak = 0
                continue
            self.total += 1
            self.streak += 1
            self._unreported.append(step)
            if self.streak >= self.max_streak:
                raise UserError(
                    f"training stopped: {self.streak} steps in a row with a non-finite loss or "
                    f"gradient (last at step {step}); lower optim.lr, raise optim.warmup_steps or "
                    "check trainer.precision"
                )

    def take_skipped(self) -> list[int]:
        """Steps skipped since the last call (settled ones only), for the progress messages."""
        skipped, self._unreported = self._unreported, []
        return skipped

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_total": self.total, "nonfinite_streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.streak = state["nonfinite_total"], state["nonfinite_streak"]


@dataclass
class LogWindow:
    """What the train log averages over: the steps since the last log line. The losses are this rank's;
    ``_log`` averages the sum over ranks (one all-reduce per log line, not per step), which gives the
    global batch's loss as one process sees it (every rank applies the same steps)."""

    loss_sum: torch.Tensor  # this rank's summed loss of the applied steps (device, no sync)
    steps: torch.Tensor  # applied (finite) steps
    items: int = 0
    started: float = 0.0  # perf_counter when the window opened (evaluation and checkpoint time excluded)

    def add(self, out: StepOutput) -> None:
        finite = torch.as_tensor(out.finite, device=self.loss_sum.device)
        self.loss_sum += torch.where(finite, out.loss, 0.0)
        self.steps += finite
        self.items += out.items

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps.zero_()
        self.items = 0
        self.started = time.perf_counter()


RESUME_MODES = "true | false | auto"


class Trainer:
    """``Trainer(cfg, task, run_dir, dist).fit()``: checks the trainer config at construction; ``setup``
    builds everything (also used alone by the bench); ``train_step`` is one optimizer step; ``fit`` runs
    the loop with logging, evaluation, checkpoints and the end-of-run export.

    Two handles on one model: ``model`` is what the train step calls (DDP or FSDP2, then torch.compile);
    ``raw_model`` is the module itself, which everything else uses: evaluation and sampling (never compiled),
    the optimizer, the task's hooks, checkpoints and export."""

    def __init__(self, cfg: DictConfig, task: Task, run_dir: Path, dist: DistInfo) -> None:
        self.cfg, self.task, self.run_dir, self.dist = cfg, task, Path(run_dir), dist
        tc = cfg.trainer
        check_trainer_options(tc)
        self.accumulation = accumulation_steps(tc.batch_size, tc.global_batch_size, dist.world_size)
        if self.accumulation > 1 and not task.supports_accumulation:
            raise UserError(
                f"task {task.family!r} does not support gradient accumulation (its loss needs the whole batch "
                f"at once); set trainer.global_batch_size=null or equal to batch_size x world size"
            )
        self.global_batch = tc.batch_size * dist.world_size * self.accumulation
        self.device = pick_device(tc.device, dist.local_rank)
        self.amp_dtype = PRECISIONS[tc.precision]
        if self.amp_dtype is torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("trainer.precision=bf16 but this GPU has no bf16; use fp16 or fp32")
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cpu" and tc.num_workers > 0 and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to each DataLoader worker: oversubscribed CPUs make the step itself much slower
            # (vit recipe on 2 cores: 1,330 images/s with 2 threads, 1,965 with 1).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - tc.num_workers))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # --- setup: model, optimization, data ---------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer.precision autocast context (a no-op for fp32), as the train step and evaluation use."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def setup(self, random_base: bool = False) -> None:
        """Build data, model, optimizer; restore a checkpoint on resume; wrap for distributed/compile.
        ``random_base`` (the bench): an adapter may adapt the randomly initialised model (the step costs the same)."""
        cfg, dist = self.cfg, self.dist
        self.resume_from = self._resume_point()
        seed_everything(cfg.trainer.seed + dist.rank)
        # On resume the source still gives the shape and inputs (the same command resumes); its weights
        # are read only under an adapter (the checkpoint holds the adapter alone).
        pretrained = load_pretrained(cfg.init_from) if cfg.init_from else None
        self.transforms = Transforms.of_run(cfg)
        self.adapter = self.transforms.adapter
        self.base = None  # what an adapter checkpoint records of its base
        if self.adapter is not None and not random_base:
            if pretrained is None:
                raise UserError("adapter=lora needs init_from=PATH: the pretrained model the adapter adapts")
            self.base = base_identity(pretrained)
        if pretrained is not None:
            self.task.use_pretrained(pretrained)
        self.task.setup(self.resume_from)
        self.model_config = self.task.model_config()
        raw = build_model(self.model_config).to(self.device)
        pin_attention_kernel(raw, cfg.trainer.attention, bool(cfg.trainer.compile) and self.device.type == "cuda")
        if cfg.trainer.bf16_residual:
            keep_residual_in(raw, torch.bfloat16)
        if pretrained is not None and (self.resume_from is None or self.adapter is not None):
            load_pretrained_weights(raw, pretrained)
        self._make_trainable(raw)
        self._check_exportable(raw)
        if self.resume_from is not None:
            self._check_same_model(self.resume_from)
            ckpt.load_weights(raw, self.resume_from)
        # Before the optimizer: FSDP2 shards raw in place (its parameters become DTensors).
        self.model = wrap_model(raw, cfg.trainer, dist, self.device)
        self.raw_model = raw
        self._setup_optimization()
        if cfg.trainer.compile:
            # Only the train step calls this wrapper; evaluation and sampling use raw_model (see evaluate).
            self.model = torch.compile(self.model)
        self.batches = self._batches()

    def _make_trainable(self, raw: torch.nn.Module) -> None:
        """trainer.freeze, then the adapter (which freezes the rest): before the wrapping and the optimizer, which
        take only what still needs gradients."""
        transforms.apply(raw, self.transforms)

    def _check_exportable(self, raw: torch.nn.Module) -> None:
        """export=gguf of a model that has no GGUF form fails now, not after training."""
        if self.cfg.export.gguf:
            from abi_train.export import gguf_refusal

            reason = gguf_refusal(raw)
            if reason:
                raise UserError(f"export=gguf: {reason} (or run with export=none)")

    def _resume_point(self) -> Path | None:
        """The checkpoint to continue from: resume=true needs one, resume=auto takes one when there is one
        (a requeued job re-runs the same command whether or not it got to its first checkpoint)."""
        mode = self.cfg.resume
        if mode is None or mode is False:
            return None
        if mode is not True and mode != "auto":
            raise UserError(f"resume={mode!r} is not known; valid: {RESUME_MODES}")
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None and mode is True:
            raise UserError(
                f"resume=true but {self.run_dir}/checkpoints holds no checkpoint; "
                "pass hydra.run.dir=<the run dir to continue> (resume=auto starts fresh when there is none)"
            )
        return latest

    def _setup_optimization(self) -> None:
        """Optimizer, schedule, GradScaler, the non-finite guard; their state on resume."""
        cfg, raw = self.cfg, self.raw_model
        self.optimizer = build_optimizer(raw, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.trainer.precision == "fp16")
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip else math.inf
        fp16 = cfg.trainer.precision == "fp16"
        self.nonfinite = NonFiniteGuard(
            cfg.trainer.max_nonfinite_steps,
            # Fused AdamW skips on the device; fp16 (the GradScaler decides) and FSDP's DTensors cannot.
            on_device=bool(self.optimizer.defaults.get("fused"))
            and not fp16
            and not hasattr(self.params[0], "full_tensor"),
            check_grads=not fp16,
        )
        self.step = 0
        if self.resume_from is not None:
            self._load_train_state(self.resume_from)

    def _batches(self) -> Iterator[Any]:
        """Micro-batches already on the device from this step on: copied one ahead on a side stream, or as
        they are drawn."""
        cfg, dist = self.cfg, self.dist
        sampler = GlobalBatchSampler(
            self.task.num_train_items(),
            self.global_batch,
            self.accumulation,
            dist.rank,
            dist.world_size,
            seed=cfg.trainer.seed,
            start_step=self.step,
        )
        loader = iter(self.task.train_loader(sampler))
        move = partial(self.task.to_device, device=self.device)
        if cfg.trainer.prefetch and self.device.type == "cuda":
            return DevicePrefetcher(loader, move, self.device)
        return map(move, loader)

    def _check_same_model(self, ckpt_dir: Path) -> None:
        meta = ckpt.load_meta(ckpt_dir)
        stored_adapter = meta.get("adapter")
        if (stored_adapter is None) != (self.adapter is None) or (
            stored_adapter is not None and {**stored_adapter, "base": None} != {**self._adapter_meta(), "base": None}
        ):
            raise UserError(
                f"checkpoint {ckpt_dir} was trained with adapter {stored_adapter or 'none'}; resume with the same "
                "adapter options"
            )
        if stored_adapter is not None and stored_adapter["base"]["sha256"] != self.base["sha256"]:
            raise UserError(
                f"checkpoint {ckpt_dir} adapts {stored_adapter['base']['init_from']}, but init_from="
                f"{self.cfg.init_from} has different weights; resume with the base the adapter was trained on"
            )
        stored = meta["model_config"]
        if stored != self.model_config:
            keys = set(stored) | set(self.model_config)
            changed = sorted(k for k in keys if stored.get(k) != self.model_config.get(k))
            raise UserError(
                f"checkpoint {ckpt_dir} was made by a different model shape (differs in: {', '.join(changed)}); "
                "resume with the same model options"
            )

    # --- state for exact resume: one function gathers it, one restores it ----------------------
    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": full_optimizer_state_dict(self.raw_model, self.optimizer),  # by name: any world size
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.nonfinite.state_dict(),
            "global_batch": self.global_batch,
        }

    def _load_train_state(self, ckpt_dir: Path) -> None:
        state, rng = ckpt.load_train_state(ckpt_dir, self.dist.rank)
        if state["global_batch"] != self.global_batch:
            raise UserError(
                f"checkpoint {ckpt_dir} was trained with a global batch of {state['global_batch']} but this run "
                f"uses {self.global_batch}; set trainer.global_batch_size={state['global_batch']}"
            )
        self.step = state["step"]
        load_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.nonfinite.load_state_dict(state)
        if rng is not None:
            set_rng_state(rng)

    def _adapter_meta(self) -> dict[str, Any] | None:
        return None if self.adapter is None else {**self.adapter.to_dict(), "base": self.base}

    def _meta(self) -> dict[str, Any]:
        meta = {
            "family": self.task.family,
            "model_config": self.model_config,
            "metadata": self.task.metadata(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        if self.adapter is not None:
            meta["adapter"] = self._adapter_meta()
        return meta

    def save_checkpoint(self) -> Path | None:
        """Every rank calls this: weights and optimizer state are gathered whole (collectives under FSDP),
        so any number of processes can resume the checkpoint; rank 0 writes."""
        weights, train_state = full_state_dict(self.raw_model), self._train_state()
        if self.adapter is not None:  # the adapter alone (a few MB); the base is named in meta.json
            weights = trainable_state(self.raw_model, weights)
        if self.dist.is_main:
            ckpt.begin_checkpoint(self.run_dir, self.step)
        tmp = ckpt.temp_checkpoint_dir(self.run_dir, self.step)
        barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            ckpt.write_state_dict(tmp, weights, ckpt.WEIGHTS if self.adapter is None else ckpt.ADAPTER)
        barrier()
        final = None
        if self.dist.is_main:
            final = ckpt.finish_checkpoint(
                self.run_dir,
                tmp,
                self.step,
                self._meta(),
                train_state,
                self.task.save_artifacts,
                self.cfg.trainer.keep_last,
            )
        barrier()
        return final

    def train_step(self, batches: Iterator[Any]) -> StepOutput:
        """One optimizer step: accumulate micro-batches (already on the device), unscale, clip, skip if
        non-finite, update."""
        task = self.task
        step_loss = torch.zeros((), device=self.device)
        items = 0
        for micro in range(self.accumulation):
            batch = next(batches)
            with grad_sync(self.model, enabled=micro == self.accumulation - 1):
                with self.autocast():
                    loss, logs = task.loss(self.model, batch)
                self.scaler.scale(loss / self.accumulation).backward()
            step_loss += loss.detach() / self.accumulation
            items += task.items_in(batch)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.params, self.max_norm)
        # The verdict needs no collective when the synced gradient norm decides (NonFiniteGuard.check); fp16
        # decides on the loss, so only then is the loss averaged over ranks here (NaN on one rank: on all).
        verdict_loss = step_loss if self.nonfinite.check_grads else all_reduce_mean(step_loss)
        finite: bool | torch.Tensor = self.nonfinite.check(verdict_loss, grad_norm)
        if self.nonfinite.on_device:
            # Fused AdamW leaves weights, moments and its step count alone where found_inf is 1 (the
            # GradScaler's mechanism): no host sync; the verdict is counted when the loop next settles.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            self.nonfinite.record(self.step + 1, finite)
        else:
            finite = bool(finite)  # the host sync
            if finite:
                self.scaler.step(self.optimizer)
            self.nonfinite.record(self.step + 1, finite)
            self.nonfinite.settle()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        task.after_optimizer_step(self.raw_model)
        self.step += 1
        return StepOutput(step_loss, grad_norm, finite, logs, items)

    # --- the run: fit = start, then per step log / evaluate / checkpoint, then finish ----------------
    def fit(self) -> dict[str, float]:
        """Train to trainer.max_steps (or stop_at_step); return the last logged and evaluated scalars."""
        self.setup()
        self._start_run()
        tc = self.cfg.trainer
        end = min(tc.max_steps, tc.stop_at_step or tc.max_steps)
        window = LogWindow(torch.zeros((), device=self.device), torch.zeros((), device=self.device))
        window.reset()
        if self._eval_at_start():
            self._evaluate_and_log()  # the baseline, logged at step 0
            window.started = time.perf_counter()
        self.model.train()
        while self.step < end:
            out = self.train_step(self.batches)
            window.add(out)
            last = self.step == end
            logging = bool(tc.log_every) and (self.step % tc.log_every == 0 or last)
            if logging or last or self.nonfinite.queued >= 100:
                self.nonfinite.settle()
            for step in self.nonfinite.take_skipped():
                self.progress.message(f"step {step}: non-finite loss or gradient, update skipped")
            if logging:
                self._log(out, window)
            else:
                self.progress.update(self.step)
            if tc.eval_every and (self.step % tc.eval_every == 0 or last):
                self._evaluate_and_log()
                window.started = time.perf_counter()  # evaluation time is not training throughput
            stopping_early = last and end < tc.max_steps  # always leave a checkpoint to resume from
            if (tc.ckpt_every and (self.step % tc.ckpt_every == 0 or last)) or stopping_early:
                self.nonfinite.settle()  # the saved counts must be current
                self.save_checkpoint()
                window.started = time.perf_counter()
        self._finish()
        return self.summary

    def _eval_at_start(self) -> bool:
        """trainer.eval_at_start: true | false | auto (a run that starts from init_from, not a resumed one)."""
        mode = self.cfg.trainer.get("eval_at_start", False)
        if mode not in (True, False, "auto"):
            raise UserError(f"trainer.eval_at_start={mode!r} is not known; valid: true | false | auto")
        if self.step > 0 or not self.cfg.trainer.eval_every:
            return False
        return bool(self.cfg.init_from) if mode == "auto" else mode

    def _start_run(self) -> None:
        """Rank 0 writes the run dir's config and artifacts; logger, progress bar, the one-line intro."""
        cfg, task, dist = self.cfg, self.task, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            task.save_artifacts(self.run_dir)
        self.logger = MetricsLogger(self.run_dir if dist.is_main else None, cfg.logger.tensorboard, cfg.logger.jsonl)
        self.progress = Progress(
            cfg.trainer.max_steps, self.step, task.unit, enabled=dist.is_main, mode=cfg.trainer.progress
        )
        self.flops_per_item = self.raw_model.flops_per_item()
        self.peak_flops = peak_flops(self.device)
        self.summary: dict[str, float] = {}
        if dist.is_main:
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            resumed = f", resumed from {self.resume_from.name}" if self.resume_from is not None else ""
            self.progress.message(
                f"{task.family}: {n_params / 1e6:.2f}M parameters on {self.device}, global batch "
                f"{self.global_batch} ({cfg.trainer.batch_size} x {dist.world_size} processes x "
                f"{self.accumulation} accumulation), run dir {self.run_dir}{resumed}"
            )

    def _log(self, out: StepOutput, window: LogWindow) -> None:
        """One train log line (the host sync of the window's loss); the loss and the task's extra scalars
        averaged over ranks (every rank calls this at the same steps)."""
        tc, unit = self.cfg.trainer, self.task.unit
        elapsed = time.perf_counter() - window.started
        rate = window.items / elapsed if elapsed > 0 else 0.0
        # The ranks' loss sums and the task's extra scalars averaged over ranks in one collective.
        names = sorted(out.logs)
        local = [window.loss_sum.float(), *(out.logs[k].detach().float().reshape(()) for k in names)]
        means = all_reduce_mean(torch.stack(local)).tolist()
        values = {
            "train/loss": means[0] / max(1.0, window.steps.item()),
            "lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": out.grad_norm.item(),
            f"train/{unit}_per_s": rate * self.dist.world_size,  # whole job
            "train/nonfinite_steps": float(self.nonfinite.total),
        }
        if self.peak_flops:
            values["train/mfu"] = self.flops_per_item * rate / self.peak_flops  # rate and peak are per GPU
        if self.device.type == "cuda":
            values["train/memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if tc.precision == "fp16":
            values["train/loss_scale"] = self.scaler.get_scale()
        values.update(zip(names, means[1:], strict=True))
        self.logger.scalars(self.step, values)
        self.progress.update(self.step, values["train/loss"], rate)
        self.summary.update(values)
        window.reset()

    def _evaluate_and_log(self) -> None:
        """task.evaluate on every rank (its contract: the same numbers on each); rank 0 logs them."""
        result = self.evaluate()
        if not self.dist.is_main:
            return
        self.logger.scalars(self.step, result.scalars)
        for tag, text in result.texts.items():
            self.logger.text(self.step, tag, text)
        for tag, image in result.images.items():
            self.logger.image(self.step, tag, image)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in result.scalars.items())
        self.progress.message(f"step {self.step}: {shown}")
        self.summary.update(result.scalars)

    def _finish(self) -> None:
        """Close the task and the progress bar; export=gguf writes model.gguf into the run dir."""
        cfg = self.cfg
        self.progress.close()
        self.task.close()
        if cfg.export.gguf:
            whole = full_model(self.raw_model, self.transforms)  # every rank: FSDP gathers the sharded weights
            if self.dist.is_main:
                from abi_train.export import export_gguf

                tokenizer = self.run_dir / "tokenizer.json"
                meta = {**self._meta(), "step": self.step}
                out = export_gguf(  # an adapter is merged in
                    whole,
                    meta,
                    tokenizer if tokenizer.is_file() else None,
                    self.run_dir / "model.gguf",
                    cfg.export.outtype,
                )
                self.progress.message(f"exported {out}")
                if self.adapter is not None and cfg.export.get("adapter"):
                    from abi_train.export.gguf_lora import export_gguf_lora, unexportable

                    reason = unexportable(whole, meta)  # e.g. a ViT: llama.cpp adapters are for LLMs
                    if reason:
                        self.progress.message(f"adapter.gguf not written: {reason}")
                    else:
                        self.progress.message(
                            f"exported {export_gguf_lora(whole, meta, self.run_dir / 'adapter.gguf')}"
                        )
        self.logger.close()

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """The task's evaluation of the current model in eval mode, under the run's autocast.

        It runs on ``raw_model``, never on the compiled wrapper: validation batches, prompts and one-token decode
        steps have other shapes than the train step, and eval mode and no_grad change the compiled graphs' guards,
        so each would compile anew (with graph breaks at data-dependent gathers such as SFT's labelled tokens),
        slower than eager. Without gradients DDP's wrapper adds nothing; under FSDP2 raw_model is the sharded
        module itself (each forward gathers its weights)."""
        model = self.raw_model
        model.eval()
        try:
            with self.autocast():
                return self.task.evaluate(model, self.device)
        finally:
            model.train()
