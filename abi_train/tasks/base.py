"""The per-family seam. The trainer knows nothing about tokens, images or captions; a Task does.

A Task builds the model and data for one family, turns a batch into a loss, evaluates, and says
what to save beside the weights. Accumulation, precision, clipping, logging, checkpointing and
distributed logic live in the trainer and are written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from abi_train.data.sampler import GlobalBatchSampler
from abi_train.distributed import DistInfo
from abi_train.errors import UserError
from abi_train.models import SPECS, model_spec
from abi_train.weights import Pretrained, merge_model_config


@dataclass
class EvalResult:
    scalars: dict[str, float]  # e.g. {"val/loss": 2.1, "val/ppl": 8.2}; fractions for accuracies
    texts: dict[str, str] = field(default_factory=dict)  # TensorBoard text, e.g. samples
    images: dict[str, np.ndarray] = field(default_factory=dict)  # HWC uint8 images


class Task(ABC):
    family: ClassVar[str]  # "llm" | "vit" | "clip": stored in checkpoints, picks the export map
    unit: ClassVar[str]  # throughput unit: "tokens" | "images" | "pairs"
    # Contrastive losses see negatives only inside a micro-batch, so CLIP refuses accumulation.
    supports_accumulation: ClassVar[bool] = True

    def __init__(self, cfg: DictConfig, dist: DistInfo, model_overrides: frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        self.dist = dist
        self.model_overrides = model_overrides  # model.* keys set on the command line
        self.pretrained: Pretrained | None = None

    def use_pretrained(self, pretrained: Pretrained) -> None:
        """Start from ``pretrained`` (init_from): its shape, tokenizer and input facts. Before ``setup``; a
        source of an architecture this task does not train is a UserError here, before any data is read."""
        arch = pretrained.model_config.get("arch")
        if model_spec(arch).task != self.family:
            ours = next(spec.arch for spec in SPECS.values() if spec.task == self.family)
            raise UserError(
                f"init_from={pretrained.path} holds a {arch!r} model but this run trains {ours!r} models; "
                "pick the recipe of that architecture"
            )
        self.pretrained = pretrained

    # --- setup -------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, artifact_dir: Path | None) -> None:
        """Validate config, load/generate data, build or load the tokenizer.

        ``artifact_dir`` is the run dir on resume (reuse its tokenizer), else None.
        Raise UserError for user mistakes. Must be deterministic across ranks.
        """

    @abstractmethod
    def model_config(self) -> dict[str, Any]:
        """Plain, JSON-serialisable kwargs (with ``arch``) that rebuild the model via the builder registry."""

    @abstractmethod
    def num_train_items(self) -> int:
        """Number of training examples the GlobalBatchSampler draws indices from."""

    @abstractmethod
    def train_loader(self, sampler: GlobalBatchSampler) -> Iterable[Any]:
        """An endless iterable of micro-batches (usually a DataLoader with ``batch_sampler=sampler``)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one micro-batch, plus extra detached tensors to log (no host sync here)."""

    @abstractmethod
    def items_in(self, batch: Any) -> int:
        """How many throughput units (tokens/images/pairs) this micro-batch holds (host-side)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """Validation metrics and media; called on every rank at the same steps (no_grad, the run's autocast).

        ``model`` is the module itself, never compiled and without DDP's wrapper (under FSDP2 the sharded module):
        its own methods (``generate``, ``encode_text``) are called as they are.

        The contract, the same for every family: the ranks share the items out (``distributed.eval_shard``);
        every rank makes as many forward calls as the others, a number known up front (FSDP gathers weights
        inside each: ``distributed.eval_batch_count``, ``pad_batches``); the scalars are reduced (sums via
        ``all_reduce_sum``; metrics that need every item, such as retrieval, via ``gather_shards``). So every
        rank returns the numbers one process returns for the same global batch. Only rank 0's is logged.
        """

    def model_options(self, arch: str) -> dict[str, Any]:
        """The resolved ``model`` config as plain kwargs, checked to be of this task's ``arch``; with
        init_from, the source's config (its shape) with the run's tunable options."""
        config = OmegaConf.to_container(self.cfg.model, resolve=True)
        assert isinstance(config, dict)
        if self.pretrained is not None:
            config["arch"] = arch
            return merge_model_config(
                self.pretrained.model_config, config, self.model_overrides, str(self.pretrained.path)
            )
        config.setdefault("arch", arch)
        if config["arch"] != arch:
            raise UserError(
                f"task {self.family} needs a {arch} model (arch: {arch}), got model.arch={config['arch']!r}"
            )
        return config

    # --- optional hooks ----------------------------------------------------------------------
    def to_device(self, batch: Any, device: torch.device) -> Any:
        return _move(batch, device)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """E.g. CLIP clamps its logit scale here (``model``: the module itself, as in ``evaluate``)."""

    def save_artifacts(self, directory: Path) -> None:
        """Write what inference needs beside the weights (tokenizer.json, class names)."""

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts stored in checkpoints and used by export (e.g. class names, image mean)."""
        return {}

    def close(self) -> None:
        """Report end-of-run facts (e.g. skipped corrupt images)."""

    def synthetic_batch(self, batch_size: int) -> Any:
        """One random micro-batch shaped like the train loader's (CPU tensors): the benchmark's data."""
        raise NotImplementedError(f"task {self.family!r} has no synthetic batch for the benchmark")


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch
