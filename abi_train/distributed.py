"""Process-group setup from torchrun's environment; everything rank-aware reads DistInfo."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE (a plain `python -m` run is rank 0 of 1)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t


def init_distributed(info: DistInfo, device_spec: str) -> None:
    """Join torchrun's process group (NCCL on GPUs, Gloo on CPU). No-op for a single process."""
    if not info.enabled or dist.is_initialized():
        return
    import datetime

    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda") or device_spec.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    # A finite timeout: a rank that dies takes the job down instead of leaving the others hanging.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))


def wrap_model(model: torch.nn.Module, trainer_cfg, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP when several processes run (gradient sync on the last micro-step only, via no_sync)."""
    mode = trainer_cfg.parallel
    if mode not in ("auto", "none", "ddp", "fsdp"):
        from abi_train.errors import UserError

        raise UserError(f"trainer.parallel={mode!r} is not known; valid: auto, none, ddp, fsdp")
    if not info.enabled or mode == "none":
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
