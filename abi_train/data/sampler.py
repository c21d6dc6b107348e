"""Deterministic, resumable, rank-sharded batch order shared by every task.

The data order is defined globally, independent of the number of processes: epoch ``e`` is a
permutation of the training items seeded by ``(seed, e)``, and the epochs are laid end to end.
Optimizer step ``s`` consumes global positions ``[s*G, (s+1)*G)`` where ``G`` is the global batch.
Inside a step, micro-step ``m`` of ``A`` and rank ``r`` of ``W`` take their own contiguous slice of
``b = G / (A*W)`` positions. So resuming only needs the step number, and a run resumed on a
different world size (same global batch) sees exactly the same global batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class GlobalBatchSampler:
    """Yields lists of item indices, one list per micro-batch of this rank, from ``start_step`` on."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        accumulation: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_items <= 0:
            raise ValueError("GlobalBatchSampler needs at least one item")
        if global_batch % (accumulation * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by accumulation x world size")
        self.num_items = num_items
        self.global_batch = global_batch
        self.accumulation = accumulation
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle
        self.local_batch = global_batch // (accumulation * world_size)
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_items, generator=gen)
            else:
                self._order = torch.arange(self.num_items)
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def first_position(self, step: int, micro_step: int) -> int:
        """Global draw position of this rank's first item in one micro-step (augmentations seed on it)."""
        return step * self.global_batch + (micro_step * self.world_size + self.rank) * self.local_batch

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Item indices of this rank for one micro-step of one optimizer step."""
        first = self.first_position(step, micro_step)
        out = []
        for pos in range(first, first + self.local_batch):
            epoch, offset = divmod(pos, self.num_items)
            out.append(int(self._epoch_order(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.accumulation):
                yield self.indices(step, micro)
            step += 1
