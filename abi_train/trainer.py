"""The one training loop shared by every recipe.

Accumulation, precision, clipping, non-finite skipping, the optimizer and schedule, evaluation cadence,
logging, checkpointing, resume and distributed wrapping are written here once; what differs per model
family (batch -> loss, metrics, evaluation) comes from a Task (abi_train/tasks).
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
from abi_train.metrics import MetricsLogger, Progress, peak_flops
from abi_train.models import build_model
from abi_train.models.layers import ATTENTION_KERNELS, pin_attention_kernel
from abi_train.optim import build_optimizer, build_scheduler
from abi_train.tasks.base import Task
from abi_train.utils import pick_device, rng_state, seed_everything, set_rng_state
from abi_train.weights import load_pretrained, load_pretrained_weights


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss of the step (device tensor, not synced)
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


class Trainer:
    def __init__(self, cfg: DictConfig, task: Task, run_dir: Path, dist: DistInfo) -> None:
        self.cfg, self.task, self.run_dir, self.dist = cfg, task, Path(run_dir), dist
        tc = cfg.trainer
        if tc.precision not in PRECISIONS:
            raise UserError(f"trainer.precision={tc.precision!r} is not known; valid: {', '.join(PRECISIONS)}")
        if tc.max_steps is None or tc.max_steps <= 0:
            raise UserError(f"trainer.max_steps={tc.max_steps} must be a positive integer")
        for key in ("log_every", "eval_every", "ckpt_every"):
            if tc[key] is None or tc[key] < 0:
                raise UserError(f"trainer.{key}={tc[key]} must be >= 0")
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
        if tc.attention not in ATTENTION_KERNELS:
            raise UserError(f"trainer.attention={tc.attention!r} is not known; valid: {', '.join(ATTENTION_KERNELS)}")
        if tc.bf16_residual and tc.precision != "bf16":
            raise UserError(f"trainer.bf16_residual=true needs trainer.precision=bf16, got {tc.precision!r}")
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cpu" and tc.num_workers > 0 and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to each DataLoader worker: oversubscribed CPUs make the step itself much slower
            # (vit recipe on 2 cores: 1,330 images/s with 2 threads, 1,965 with 1).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - tc.num_workers))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def setup(self) -> None:
        """Build data, model, optimizer; restore a checkpoint on resume; wrap for distributed/compile."""
        cfg, dist = self.cfg, self.dist
        self.resume_from: Path | None = None
        if cfg.resume:
            self.resume_from = ckpt.latest_checkpoint(self.run_dir)
            if self.resume_from is None:
                raise UserError(
                    f"resume=true but {self.run_dir}/checkpoints holds no checkpoint; "
                    "pass hydra.run.dir=<the run dir to continue>"
                )
        seed_everything(cfg.trainer.seed + dist.rank)
        # On resume the source still gives the shape and inputs (the same command resumes); its weights
        # are not read.
        pretrained = load_pretrained(cfg.init_from) if cfg.init_from else None
        if pretrained is not None:
            self.task.use_pretrained(pretrained)
        self.task.setup(self.resume_from)
        self.model_config = self.task.model_config()
        raw = build_model(self.model_config).to(self.device)
        pin_attention_kernel(raw, cfg.trainer.attention)
        if cfg.trainer.bf16_residual:
            keep_residual_in(raw, torch.bfloat16)
        if self.resume_from is not None:
            self._check_same_model(self.resume_from)
            ckpt.load_weights(raw, self.resume_from)
        elif pretrained is not None:
            load_pretrained_weights(raw, pretrained)
        # Before the optimizer: FSDP2 shards raw in place (its parameters become DTensors).
        self.model = wrap_model(raw, cfg.trainer, dist, self.device)
        self.raw_model = raw
        self.optimizer = build_optimizer(raw, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.trainer.precision == "fp16")
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        if self.resume_from is not None:
            self._load_train_state(self.resume_from)
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip else math.inf
        # Fused AdamW can skip a non-finite step on the GPU (found_inf), so the hot loop needs no host sync;
        # fp16 (the GradScaler decides) and FSDP's sharded DTensor parameters keep the synced path.
        self.skip_on_device = (
            bool(self.optimizer.defaults.get("fused"))
            and cfg.trainer.precision != "fp16"
            and not hasattr(self.params[0], "full_tensor")
        )
        self._unsettled: list[tuple[int, bool | torch.Tensor]] = []  # (step, finite) not yet counted
        self.skipped_steps: list[int] = []  # counted skips not yet reported by fit
        if cfg.trainer.compile:
            self.model = torch.compile(self.model)
        sampler = GlobalBatchSampler(
            self.task.num_train_items(),
            self.global_batch,
            self.accumulation,
            dist.rank,
            dist.world_size,
            seed=cfg.trainer.seed,
            start_step=self.step,
        )
        # Micro-batches already on the device: copied one ahead on a side stream, or as they are drawn.
        loader = iter(self.task.train_loader(sampler))
        move = partial(self.task.to_device, device=self.device)
        if cfg.trainer.prefetch and self.device.type == "cuda":
            self.batches: Iterator[Any] = DevicePrefetcher(loader, move, self.device)
        else:
            self.batches = map(move, loader)

    def _check_same_model(self, ckpt_dir: Path) -> None:
        stored = ckpt.load_meta(ckpt_dir)["model_config"]
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
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
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
        self.nonfinite_total = state["nonfinite_total"]
        self.nonfinite_streak = state["nonfinite_streak"]
        if rng is not None:
            set_rng_state(rng)

    def _meta(self) -> dict[str, Any]:
        return {
            "family": self.task.family,
            "model_config": self.model_config,
            "metadata": self.task.metadata(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank calls this: weights and optimizer state are gathered whole (collectives under FSDP),
        so any number of processes can resume the checkpoint; rank 0 writes."""
        weights, train_state = full_state_dict(self.raw_model), self._train_state()
        if self.dist.is_main:
            ckpt.begin_checkpoint(self.run_dir, self.step)
        tmp = ckpt.temp_checkpoint_dir(self.run_dir, self.step)
        barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            ckpt.write_state_dict(tmp, weights)
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
        tc, task = self.cfg.trainer, self.task
        step_loss = torch.zeros((), device=self.device)
        items = 0
        for micro in range(self.accumulation):
            batch = next(batches)
            with grad_sync(self.model, enabled=micro == self.accumulation - 1):
                with self._autocast():
                    loss, logs = task.loss(self.model, batch)
                self.scaler.scale(loss / self.accumulation).backward()
            step_loss += loss.detach() / self.accumulation
            items += task.items_in(batch)
        step_loss = all_reduce_mean(step_loss)  # the loss of the global batch, as one process would see it
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.params, self.max_norm)
        # A non-finite loss or gradient skips the update.
        # (fp16 gradient overflow is the GradScaler's normal business, not a divergence.)
        finite = torch.isfinite(step_loss)
        if tc.precision != "fp16":
            finite = finite & torch.isfinite(grad_norm)
        if self.skip_on_device:
            # Fused AdamW leaves weights, moments and its step count alone where found_inf is 1 (the
            # GradScaler's mechanism): no host sync; the flags are counted when fit next syncs.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            self._unsettled.append((self.step + 1, finite))
        else:
            finite = bool(finite)  # the host sync
            if finite:
                self.scaler.step(self.optimizer)
            self._unsettled.append((self.step + 1, finite))
            self.settle_nonfinite()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        task.after_optimizer_step(self.raw_model)
        self.step += 1
        return StepOutput(step_loss, grad_norm, finite, logs, items)

    def settle_nonfinite(self) -> None:
        """Count the steps skipped since the last call (one host sync for device flags) into
        nonfinite_total/streak and skipped_steps; stop after trainer.max_nonfinite_steps in a row."""
        if not self._unsettled:
            return
        steps = [step for step, _ in self._unsettled]
        flags = torch.stack([torch.as_tensor(f) for _, f in self._unsettled]).tolist()
        self._unsettled = []
        for step, finite in zip(steps, flags, strict=True):
            if finite:
                self.nonfinite_streak = 0
                continue
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            self.skipped_steps.append(step)
            if self.nonfinite_streak >= self.cfg.trainer.max_nonfinite_steps:
                raise UserError(
                    f"training stopped: {self.nonfinite_streak} steps in a row with a non-finite loss or "
                    f"gradient (last at step {step}); lower optim.lr, raise optim.warmup_steps or "
                    "check trainer.precision"
                )

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to trainer.max_steps; return the last logged and evaluated scalars."""
        self.setup()
        cfg, tc, dist, task = self.cfg, self.cfg.trainer, self.dist, self.task
        is_main = dist.is_main
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            task.save_artifacts(self.run_dir)
        logger = MetricsLogger(self.run_dir if is_main else None, cfg.logger.tensorboard, cfg.logger.jsonl)
        progress = Progress(tc.max_steps, self.step, task.unit, enabled=is_main, mode=tc.progress)
        flops_per_item = task.flops_per_item(self.raw_model)
        peak = peak_flops(self.device)
        summary: dict[str, float] = {}
        if is_main:
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            progress.message(
                f"{task.family}: {n_params / 1e6:.2f}M parameters on {self.device}, global batch "
                f"{self.global_batch} ({tc.batch_size} x {dist.world_size} processes x {self.accumulation} "
                f"accumulation), run dir {self.run_dir}"
            )

        loss_sum = torch.zeros((), device=self.device)
        steps_since_log = torch.zeros((), device=self.device)  # steps whose update was applied
        items_since_log = 0
        t_last = time.perf_counter()
        self.model.train()
        end = min(tc.max_steps, tc.stop_at_step or tc.max_steps)
        while self.step < end:
            out = self.train_step(self.batches)
            items_since_log += out.items
            finite = torch.as_tensor(out.finite, device=self.device)
            loss_sum += torch.where(finite, out.loss, 0.0)
            steps_since_log += finite
            grad_norm, extra_logs = out.grad_norm, out.logs

            last = self.step == end
            logging = tc.log_every and (self.step % tc.log_every == 0 or last)
            if logging or last or len(self._unsettled) >= 100:
                self.settle_nonfinite()
            for step in self.skipped_steps:
                progress.message(f"step {step}: non-finite loss or gradient, update skipped")
            self.skipped_steps.clear()
            if logging:
                elapsed = time.perf_counter() - t_last
                rate = items_since_log / elapsed if elapsed > 0 else 0.0
                values = {
                    "train/loss": loss_sum.item() / max(1.0, steps_since_log.item()),
                    "lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm.item(),
                    f"train/{task.unit}_per_s": rate * dist.world_size,  # whole job
                    "train/nonfinite_steps": float(self.nonfinite_total),
                }
                if peak:
                    values["train/mfu"] = flops_per_item * rate / peak  # rate and peak are per GPU
                if self.device.type == "cuda":
                    values["train/memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if tc.precision == "fp16":
                    values["train/loss_scale"] = self.scaler.get_scale()
                values.update({k: float(v) for k, v in extra_logs.items()})
                logger.scalars(self.step, values)
                progress.update(self.step, values["train/loss"], rate)
                summary.update(values)
                loss_sum.zero_()
                steps_since_log.zero_()
                items_since_log = 0
                t_last = time.perf_counter()
            else:
                progress.update(self.step)

            if tc.eval_every and (self.step % tc.eval_every == 0 or last):
                result = self._evaluate()
                if is_main:
                    logger.scalars(self.step, result.scalars)
                    for tag, text in result.texts.items():
                        logger.text(self.step, tag, text)
                    for tag, image in result.images.items():
                        logger.image(self.step, tag, image)
                    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.scalars.items())
                    progress.message(f"step {self.step}: {shown}")
                    summary.update(result.scalars)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            stopping_early = last and end < tc.max_steps  # always leave a checkpoint to resume from
            if (tc.ckpt_every and (self.step % tc.ckpt_every == 0 or last)) or stopping_early:
                self.settle_nonfinite()  # the saved counts must be current
                self.save_checkpoint()
                t_last = time.perf_counter()

        progress.close()
        task.close()
        if cfg.export.gguf:
            whole = full_model(self.raw_model)  # every rank: FSDP gathers the sharded weights
        if cfg.export.gguf and is_main:
            from abi_train.export import export_gguf

            tokenizer = self.run_dir / "tokenizer.json"
            out = export_gguf(
                whole,
                {**self._meta(), "step": self.step},
                tokenizer if tokenizer.is_file() else None,
                self.run_dir / "model.gguf",
                cfg.export.outtype,
            )
            progress.message(f"exported {out}")
        logger.close()
        return summary

    @torch.no_grad()
    def _evaluate(self):
        self.model.eval()
        try:
            with self._autocast():
                return self.task.evaluate(self.model, self.device)
        finally:
            self.model.train()
