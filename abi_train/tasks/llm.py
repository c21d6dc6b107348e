"""LLM training: next-token cross entropy over fixed windows of a token stream, from scratch or from
pretrained weights (``init_from``).

Data is ``data=text`` (files or the built-in corpus, tokenized once and cached) or ``data=shards``
(pre-tokenized, memory-mapped). The tokenizer comes from the checkpoint on resume, else from the init_from
source (with its special tokens and chat template), else ``data.tokenizer``, else it is trained on the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from abi_train.data import data_source
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.tokenizer import Tokenizer
from abi_train.data.tokens import TokenWindows, collate_windows
from abi_train.distributed import all_reduce_sum, eval_batch_count, eval_shard, main_first
from abi_train.errors import UserError
from abi_train.tasks.base import EvalResult, Task

SAMPLE_PROMPT = "The"  # the evaluation sample continues this, with a fixed seed, so samples compare over time
SAMPLE_TOKENS = 48


class LLMTask(Task):
    family: ClassVar[str] = "llm"
    unit: ClassVar[str] = "tokens"

    def setup(self, artifact_dir: Path | None) -> None:
        d = self.cfg.data
        data = data_source(d, self.family)  # before any data.KEY: a wrong group is one line, not a missing key
        self.seq_len = self._checked_seq_len(minimum=1)
        tokenizer, _ = self._tokenizer_to_use(artifact_dir)
        with main_first(self.dist):  # rank 0 tokenizes and caches first; the others then read the cache
            tokens = data.open(d, tokenizer=tokenizer)
        train, val, self.tokenizer = tokens.train, tokens.val, tokens.tokenizer
        self.vocab_size = self._checked_vocab_size()
        self.train_set = TokenWindows(train, self.seq_len)
        self.val_set = TokenWindows(val, self.seq_len)
        for split, ds, arrays in (("training", self.train_set, train), ("validation", self.val_set, val)):
            if len(ds) == 0:
                raise UserError(
                    f"the {split} split has {sum(map(len, arrays))} tokens, fewer than one window of "
                    f"data.seq_len+1={self.seq_len + 1}; use more text, a smaller data.seq_len"
                    + (" or a larger data.val_fraction" if split == "validation" else "")
                )

    # --- what the LLM and SFT tasks share in setup ---------------------------------------------------
    def _checked_seq_len(self, minimum: int) -> int:
        """data.seq_len, at least ``minimum`` and at most the model's (or init_from's) context."""
        seq_len = int(self.cfg.data.seq_len)
        source = self.pretrained
        context = (source.model_config if source else self.cfg.model).get("context_length")
        if context is not None and seq_len > context:
            raise UserError(f"data.seq_len={seq_len} is larger than model.context_length={context}")
        if seq_len < minimum:
            raise UserError(f"data.seq_len must be an integer of at least {minimum}, got {seq_len}")
        return seq_len

    def _tokenizer_to_use(self, artifact_dir: Path | None) -> tuple[Tokenizer | None, str]:
        """The tokenizer of this run and where it comes from: the run's own on resume, else init_from's, else
        data.tokenizer, else None (the data trains one); a data.tokenizer other than init_from's is an error."""
        d, source = self.cfg.data, self.pretrained
        tokenizer_path = d.get("tokenizer")
        tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path else None
        origin = f"data.tokenizer={tokenizer_path}"
        if source is not None:
            if source.tokenizer is None:
                raise UserError(f"init_from={source.path} holds no tokenizer (tokenizer.json), which an LLM needs")
            if tokenizer is not None and tokenizer.fingerprint != source.tokenizer.fingerprint:
                raise UserError(
                    f"data.tokenizer={tokenizer_path} differs from the tokenizer of init_from={source.path}"
                )
            tokenizer, origin = source.tokenizer, f"init_from={source.path}"
        if artifact_dir is not None and (Path(artifact_dir) / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(Path(artifact_dir) / "tokenizer.json")  # resume: the run's own tokenizer
            origin = f"the run's {Path(artifact_dir) / 'tokenizer.json'}"
        return tokenizer, origin

    def _checked_vocab_size(self) -> int:
        """model.vocab_size (init_from's), or the tokenizer's size rounded up to 64; never below the tokenizer's."""
        source = self.pretrained
        vocab_size = (source.model_config if source else self.cfg.model).get("vocab_size") or 64 * math.ceil(
            self.tokenizer.vocab_size / 64
        )
        if self.tokenizer.vocab_size > vocab_size:
            raise UserError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than model.vocab_size={vocab_size}; "
                "raise model.vocab_size or set it to null (tokenizer size rounded up to 64)"
            )
        return vocab_size

    def model_config(self) -> dict[str, Any]:
        config = self.model_options("gpt")
        config["vocab_size"] = self.vocab_size
        return config

    def num_train_items(self) -> int:
        return len(self.train_set)

    def train_loader(self, sampler: GlobalBatchSampler) -> Iterable[Any]:
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.cfg.trainer.num_workers,
            pin_memory=torch.cuda.is_available() and str(self.cfg.trainer.device) != "cpu",
            collate_fn=collate_windows,
        )

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return model(x, y), {}

    def items_in(self, batch: Any) -> int:
        return batch[0].numel()

    def synthetic_batch(self, batch_size: int) -> Any:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=gen)
        return collate_windows(list(tokens))

    def _val_indices(self) -> list[int]:
        """The same validation windows every time: evenly spread over the whole split; eval_batches
        batches of the global batch size, so their number does not depend on the number of processes."""
        tc = self.cfg.trainer
        n = min(len(self.val_set), tc.eval_batches * (tc.global_batch_size or tc.batch_size * self.dist.world_size))
        return np.linspace(0, len(self.val_set) - 1, n).round().astype(int).tolist()

    def _val_batch(self, items: list[int]) -> Any:
        """The validation items ``items`` as one batch (CPU): windows here, packed conversations in SFT."""
        return collate_windows([self.val_set[j] for j in items])

    def _learned_tokens(self, batch: Any) -> int | torch.Tensor:
        """How many tokens of ``batch`` its loss averages over (every one here; SFT: the labelled ones)."""
        return batch[0].numel()

    def _val_loss(self, model: nn.Module, device: torch.device) -> float:
        """The loss over fixed validation items spread over the split (``_val_indices``); the ranks share them
        out and sum (loss x learned tokens, learned tokens), so any world size gives one process's number."""
        indices, batch_size = self._val_indices(), self.cfg.trainer.batch_size
        mine = [indices[i] for i in eval_shard(len(indices), self.dist.rank, self.dist.world_size)]
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss x tokens, tokens
        # As many batches on every rank (FSDP: each forward is collective); a short shard's last ones run on
        # item 0 and are not counted.
        for b in range(eval_batch_count(len(indices), self.dist.world_size, batch_size)):
            part = mine[b * batch_size : (b + 1) * batch_size]
            batch = self.to_device(self._val_batch(part or indices[:1]), device)
            loss, _ = self.loss(model, batch)
            if part:
                tokens = self._learned_tokens(batch)
                stats[0] += loss.double() * tokens
                stats[1] += tokens
        total, count = all_reduce_sum(stats).tolist()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        """val/loss over fixed windows spread over the split; the ranks share them out and sum (loss x
        tokens, tokens), so any world size gives one process's number. The sample continues a fixed prompt."""
        was_training = model.training
        model.eval()
        try:
            loss = self._val_loss(model, device)
            # A local generator: sampling must not move the global RNG, or resumed runs would diverge.
            # Every rank samples (under FSDP each forward is collective); rank 0's text is logged.
            gen = torch.Generator(device=device).manual_seed(0)
            prompt = torch.tensor([self.tokenizer.encode(SAMPLE_PROMPT)], device=device)
            out = model.generate(prompt, SAMPLE_TOKENS, temperature=0.8, top_k=40, generator=gen)
            sample = self.tokenizer.decode(out[0].tolist())
        finally:
            model.train(was_training)
        return EvalResult(
            scalars={"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))},
            texts={"samples/text": sample},
        )

    def save_artifacts(self, directory: Path) -> None:
        self.tokenizer.save(Path(directory) / "tokenizer.json")

    def metadata(self) -> dict[str, Any]:
        t = self.tokenizer
        return {
            "tokenizer": {"bos_id": t.bos_id, "eos_id": t.eos_id, "pad_id": t.pad_id},
            "seq_len": self.seq_len,
        }
