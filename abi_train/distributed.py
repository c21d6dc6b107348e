"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, consolidated state.

One process per GPU (or CPU process on Gloo). Everything rank-aware reads DistInfo. PyTorch's own engine
does the work: torchrun launches, DDP or FSDP2 (``fully_shard``) synchronise gradients, and
``torch.distributed.checkpoint.state_dict`` gathers full (unsharded) weights and optimizer state, so
checkpoints do not depend on the number of processes that wrote them.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from abi_train.errors import UserError

if TYPE_CHECKING:
    from abi_train.transforms import Transforms

T = TypeVar("T")

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
RUN_STAMP_ENV = "ABI_RUN_STAMP"  # configs/train.yaml names the default run dir after it
# A collective that waits longer than this fails (a hung rank ends the job instead of blocking it forever).
TIMEOUT = datetime.timedelta(minutes=10)


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


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor); ``t`` itself when not distributed."""
    if not _initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)  # SUM, then divide: Gloo has no ReduceOp.AVG
    return t / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor); ``t`` itself when not distributed."""
    if not _initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


# --- evaluation: every rank takes a slice, the numbers are those of one process --------------------
def eval_shard(n: int, rank: int, world_size: int) -> range:
    """This rank's items of an evaluation over ``n`` items: every world_size-th, so ``gather_shards`` can
    interleave the ranks' results back into the original order."""
    return range(rank, n, world_size)


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed for ``eval_shard(n, rank, world)`` on every rank -> all ``n`` rows in item order, on
    every rank. Shards differ by at most one row; the short ones are padded for the all_gather and the
    padding (last in item order) is cut off."""
    if not _initialized():
        return local
    world = dist.get_world_size()
    rows = -(-n // world)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    # parts[r][k] is item r + k * world: stacking on dim 1 lays the items out in order.
    return torch.stack(parts, dim=1).reshape(rows * world, *local.shape[1:])[:n]


def eval_batch_count(n: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs in an evaluation over ``n`` items: those of the largest shard. FSDP2 gathers
    weights inside every forward, so a rank with one batch fewer would leave the others waiting; the count
    is known up front, so no rank has to ask the others (a collective among the forwards would deadlock)."""
    largest_shard = math.ceil(n / world_size)
    return math.ceil(largest_shard / batch_size)


def pad_batches(batches: Iterable[T], count: int) -> Iterator[T | None]:
    """``batches``, then None until ``count`` were yielded (a None asks for a forward call whose result is
    not counted)."""
    yielded = 0
    for batch in batches:
        yield batch
        yielded += 1
    for _ in range(count - yielded):
        yield None


# --- before Hydra: one run dir for all ranks, one error message per job -----------------------------
@cache
def _agent_store() -> dist.Store | None:
    """The key-value store torchrun's agent serves to its workers (None outside torchrun)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=TIMEOUT)


def launch_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that make the processes of one torchrun job share a single run dir.

    Hydra resolves ``${now:}`` in every process, so the default run dir name would differ per rank.
    The first rank to ask stores its timestamp in torchrun's store and every rank reads that one back
    (atomic compare-and-set, no file race) into ABI_RUN_STAMP, which the run dir's name uses. Ranks > 0
    also skip Hydra's own outputs (.hydra/ and the log file): rank 0 writes everything in the run dir.
    """
    info = dist_info_from_env()
    if not info.enabled:
        return []
    if RUN_STAMP_ENV not in os.environ and not any(a.startswith("hydra.run.dir=") for a in argv):
        store = _agent_store()
        if store is None:
            raise UserError(
                f"{info.world_size} processes were started without torchrun, so they cannot agree on a run dir; "
                f"pass hydra.run.dir=DIR (or set {RUN_STAMP_ENV}) identically on every process"
            )
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        os.environ[RUN_STAMP_ENV] = store.compare_set("abi_train/run_stamp", "", stamp).decode()
    if info.is_main:
        return []
    extra = []
    if not any(a.startswith("hydra.output_subdir") for a in argv):
        extra.append("hydra.output_subdir=null")
    if not any(a.startswith("hydra/job_logging") for a in argv):
        extra.append("hydra/job_logging=none")
    return extra


def claim_error_report() -> bool:
    """True for the one process of a torchrun job that should print a user error (the first to fail).

    The same bad setting usually fails on every rank at once; the job should say so once.
    """
    info = dist_info_from_env()
    if not info.enabled:
        return True
    try:
        store = _agent_store()
        if store is None:
            return True
        key = f"abi_train/error_reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return store.compare_set(key, "", str(info.rank)).decode() == str(info.rank)
    except Exception:  # the agent may already be tearing the job down: better twice than never
        return True


# --- process group and model wrapping ------------------------------------------------------------
def init_distributed(info: DistInfo, device_spec: str) -> None:
    """Join torchrun's process group (NCCL on GPUs, Gloo on CPU). No-op for a single process."""
    if not info.enabled or _initialized():
        return
    from abi_train.utils import pick_device

    device = pick_device(device_spec, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)


def resolve_parallel(mode: str, info: DistInfo) -> str:
    """trainer.parallel -> "none" | "ddp" | "fsdp" for this job (auto: ddp when several processes run)."""
    if mode not in PARALLEL_MODES:
        raise UserError(f"trainer.parallel={mode!r} is not known; valid: {', '.join(PARALLEL_MODES)}")
    if not info.enabled:
        return "none"  # one process: nothing to synchronise, whatever was asked
    if mode == "none":
        raise UserError(
            f"trainer.parallel=none with {info.world_size} processes would train {info.world_size} separate "
            "models; use trainer.parallel=ddp or fsdp (or auto)"
        )
    return "ddp" if mode == "auto" else mode


@dataclass(frozen=True)
class DDPOptions:
    """trainer.ddp: how DDP buckets and all-reduces gradients (configs/trainer/default.yaml says why each
    default). The defaults here are PyTorch's own, for callers that pass no trainer.ddp."""

    bucket_cap_mb: float = 25.0  # gradients all-reduced together, in MiB of the gradient dtype
    gradient_as_bucket_view: bool = False  # .grad are views into the buckets (no copy, one gradient buffer)
    static_graph: bool = False  # the same parameters get gradients in the same order every step
    optimize: str = "ddp_optimizer"  # torch._dynamo.config.optimize_ddp under trainer.compile


@dataclass(frozen=True)
class FSDPOptions:
    """trainer.fsdp: FSDP2's memory/communication trade-offs; defaults as ``fully_shard``'s own."""

    reshard_after_forward: bool = True  # ZeRO-3: free gathered blocks after forward, gather again in backward
    prefetch: int = 0  # 0: FSDP2's implicit one-block-ahead; N: explicitly N blocks ahead (forward and backward)


DDP_OPTIMIZE = ("ddp_optimizer", "no_optimization")  # python_reducer needs compiled autograd around backward


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _options(cls: type[T], cfg: Any, key: str) -> T:
    """trainer.KEY as ``cls``; a key ``cls`` does not have, or a value of the wrong type, is a UserError."""
    given = dict(cfg) if cfg is not None else {}
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise UserError(f"trainer.{key}.{unknown[0]} is not known; valid: {', '.join(fields)}")
    for name, value in given.items():
        want = type(getattr(cls(), name))
        accepted = (int, float) if want is float else want  # a YAML 25 is an int
        if not isinstance(value, accepted) or (want is not bool and isinstance(value, bool)):
            raise UserError(f"trainer.{key}.{name}={value!r} must be {_KIND[want]}")
    return cls(**given)


def ddp_options(cfg: Any) -> DDPOptions:
    """trainer.ddp checked: a positive bucket size, a known compile mode."""
    opts = _options(DDPOptions, cfg, "ddp")
    if opts.bucket_cap_mb <= 0:
        raise UserError(f"trainer.ddp.bucket_cap_mb={opts.bucket_cap_mb} must be > 0 (MiB per all-reduce bucket)")
    if opts.optimize not in DDP_OPTIMIZE:
        raise UserError(f"trainer.ddp.optimize={opts.optimize!r} is not known; valid: {', '.join(DDP_OPTIMIZE)}")
    return opts


def fsdp_options(cfg: Any) -> FSDPOptions:
    """trainer.fsdp checked: prefetch is a block count >= 0."""
    opts = _options(FSDPOptions, cfg, "fsdp")
    if opts.prefetch < 0:
        raise UserError(f"trainer.fsdp.prefetch={opts.prefetch!r} must be an integer >= 0 (blocks gathered ahead)")
    return opts


def wrap_model(model: nn.Module, trainer_cfg: Any, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP (a wrapper) or FSDP2 (shards ``model`` in place: build the optimizer after this), with the
    trainer.ddp / trainer.fsdp options (PyTorch's defaults where the config has none). Both are checked
    whatever the mode, so a bad value fails on one process too, not first on the multi-GPU job."""
    mode = resolve_parallel(trainer_cfg.parallel, info)
    opts, fsdp_opts = ddp_options(trainer_cfg.get("ddp")), fsdp_options(trainer_cfg.get("fsdp"))
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        global_batch = trainer_cfg.get("global_batch_size")
        if opts.static_graph and global_batch and global_batch != trainer_cfg.batch_size * info.world_size:
            # The first backward under no_sync trips an internal assert, and past it gradients would stop being
            # all-reduced (pytorch/pytorch#143580, fix pending in #187732).
            raise UserError(
                "trainer.ddp.static_graph=true does not work with gradient accumulation in this PyTorch "
                f"(trainer.global_batch_size={global_batch} > batch_size x world size); set it false"
            )
        if trainer_cfg.get("compile"):
            # Read when torch.compile traces the DDP module: split the graph at bucket boundaries so each
            # bucket's all-reduce overlaps the rest of the backward (ddp_optimizer, torch's default), or not.
            torch._dynamo.config.optimize_ddp = opts.optimize
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=opts.bucket_cap_mb,
            gradient_as_bucket_view=opts.gradient_as_bucket_view,
            static_graph=opts.static_graph,
        )
    if mode == "fsdp":
        return shard_model(model, trainer_cfg.precision, device, fsdp_opts)
    return model


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP2's dtype policy for trainer.precision.

    bf16: parameters gathered and computed in bf16, gradients reduced in fp32 (the sharded master
    weights and optimizer state stay fp32). fp16: parameters stay fp32 and autocast computes in fp16:
    the GradScaler's scaled gradients could overflow an fp16 reduction, and its inf check over DTensor
    gradients is already reduced across ranks. fp32: no casts.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: nn.Module, precision: str, device: torch.device, options: FSDPOptions | None = None
) -> nn.Module:
    """FSDP2: ``fully_shard`` every module of every ``blocks`` ModuleList (gpt, vit, clip's two towers),
    then the root, which keeps the rest (embeddings, tied lm_head, final norm) in one unit.

    ``options.reshard_after_forward=False`` keeps each block's gathered parameters from its forward to its
    backward (ZeRO-2 style: one all-gather per block and step instead of two, the whole model's unsharded
    parameters held at the end of the forward). ``options.prefetch=N`` has each block start gathering the
    next N blocks (forward) or the previous N (backward) as it starts, instead of FSDP2's implicit one ahead,
    as torchtitan does for its ``fsdp`` prefetch setting.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"trainer.parallel=fsdp needs torch >= 2.6 (FSDP2); this is {torch.__version__}") from None
    options = options or FSDPOptions()
    scalars = [name for name, p in model.named_parameters() if p.ndim == 0]
    if scalars:
        raise UserError(
            f"trainer.parallel=fsdp cannot shard this model: FSDP2 does not take 0-dim parameters "
            f"({', '.join(scalars)}); use trainer.parallel=ddp"
        )
    # Ranks seeded differently built different initial weights; DDP would broadcast rank 0's, FSDP does not.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = fsdp_mixed_precision(precision)
    towers = []
    for module in list(model.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
            towers.append(list(blocks))
    # The root keeps FSDP2's default for roots (not resharded: the backward needs it first).
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if options.prefetch:
        for blocks in towers:
            for i, block in enumerate(blocks):
                ahead, behind = blocks[i + 1 : i + 1 + options.prefetch], blocks[max(0, i - options.prefetch) : i]
                if ahead:
                    block.set_modules_to_forward_prefetch(ahead)
                if behind:
                    block.set_modules_to_backward_prefetch(behind[::-1])  # nearest first: backward runs in reverse
    return model


def _is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # what fully_shard turns a module into (FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward+backward of one micro-step; with ``enabled=False`` gradients accumulate locally
    (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``) and the last micro-step syncs them all."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm``; return the global gradient norm before clipping as a plain tensor.

    With FSDP2 the gradients are DTensor shards: the norm is reduced over ranks and comes back as a
    replicated DTensor, the same number a single process computes on the full gradients.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# --- consolidated state: the same files whatever the number of processes --------------------------
def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (collective under FSDP: every rank calls it; rank 0 receives, others get {}).

    Tied parameters (GPT's lm_head = tok_embd) come back as one tensor under each of their names,
    as in ``model.state_dict()``, so savers can store them once.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if not state:
        return state
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(p), name)
        if first != name and first in state:
            state[name] = state[first]
    return state


def full_model(model: nn.Module, transforms: Transforms) -> nn.Module | None:
    """``model`` with whole weights, for rank-0 work such as export: itself unless FSDP2 sharded it, else
    (collective: every rank calls it) a copy rebuilt on CPU with the run's ``transforms`` for rank 0, and None
    for the other ranks."""
    if not _is_fsdp(model):
        return model
    state = full_state_dict(model)
    if not state:
        return None
    from abi_train.models import build_model
    from abi_train.transforms import apply

    whole = apply(build_model(model.config), transforms)
    whole.load_state_dict(state)
    return whole.train(model.training)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter names (collective; rank 0 receives, others get {}).

    Keyed by name rather than position, it loads into any world size and into DDP or FSDP alike.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, name-keyed optimizer state (every rank holds it; FSDP keeps its own shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def main_first(dist: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (filling caches); the other ranks run it after, hitting the cache."""
    if not dist.is_main:
        barrier()
    yield
    if dist.is_main:
        barrier()
