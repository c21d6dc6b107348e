"""Chat supervised fine-tuning (``recipe=sft``): next-token cross entropy on the assistant's tokens of
conversations rendered with the chat template (``data=chat``, abi_train/data/sft.py).

To everything downstream this is an LLM run: ``family`` is ``"llm"`` (stored in checkpoints), the model is
the ``gpt`` architecture and the tokenizer (with the template the run trained on) is saved as the LLM task
saves it, so export, ``generate --chat`` and init_from treat an SFT run as any LLM run.

Evaluation: ``val/loss`` over the learned tokens of the held-out conversations (sums reduced over ranks, the
``Task.evaluate`` contract), a few sampled replies to held-out prompts (TensorBoard text) and, with
``data.persona`` set, ``val/persona_rate``: the share of greedy replies to held-out identity questions (rows
whose ``kind`` is ``identity``) that name the persona, and ``val/persona_leak``: the share of replies to the
other held-out prompts that name it although nobody asked.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from abi_train.data import data_source
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.sft import (
    ChatData,
    Example,
    LengthBuckets,
    PackedRows,
    PaddedConversations,
    collate_packed,
    collate_padded,
)
from abi_train.distributed import all_reduce_sum, eval_batch_count, eval_shard, main_first
from abi_train.tasks.base import EvalResult
from abi_train.tasks.llm import LLMTask


class SFTTask(LLMTask):
    family: ClassVar[str] = "llm"  # an LLM to export, generate and init_from (see the module docstring)
    unit: ClassVar[str] = "tokens"  # real tokens: packing's and padding's pad tokens are not counted

    def setup(self, artifact_dir: Path | None) -> None:
        d = self.cfg.data
        data = data_source(d, "sft")  # before any data.KEY: a wrong group is one line, not a missing key
        self.seq_len = self._checked_seq_len(minimum=2)
        tokenizer, origin = self._tokenizer_to_use(artifact_dir)
        with main_first(self.dist):
            chat: ChatData = data.open(d, tokenizer=tokenizer, origin=origin)
        self.chat = chat
        self.tokenizer = chat.encoder.tokenizer
        self.tokenizer.chat_template = chat.encoder.template  # saved with the run: the template it learned
        self.vocab_size = self._checked_vocab_size()
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.packing = bool(d.get("packing", True))
        if self.packing:
            self.train_set: Any = PackedRows(chat.train, self.seq_len, pad)
        else:
            self.train_set = PaddedConversations(chat.train, pad)
        self.val_set = PackedRows(chat.val, self.seq_len, pad)  # the loss is the same packed or not
        self.persona = d.get("persona")
        self.reply_tokens = int(d.get("reply_tokens") or 32)
        self.num_samples = int(d.get("samples") or 0)
        if self.dist.is_main:
            mode = f"packed into {len(self.train_set)} rows" if self.packing else "padded per micro-batch"
            print(f"{chat.report}; training conversations {mode}", file=sys.stderr)

    def num_train_items(self) -> int:
        return len(self.train_set)

    def train_loader(self, sampler: GlobalBatchSampler) -> Iterable[Any]:
        pin = torch.cuda.is_available() and str(self.cfg.trainer.device) != "cpu"
        workers = self.cfg.trainer.num_workers
        if self.packing:
            return DataLoader(
                self.train_set, batch_sampler=sampler, num_workers=workers, pin_memory=pin, collate_fn=collate_packed
            )
        pad = self.train_set.pad_id
        return DataLoader(
            self.train_set,
            batch_sampler=LengthBuckets(sampler, [ex.inputs for ex in self.chat.train]),
            num_workers=workers,
            pin_memory=pin,
            collate_fn=partial(collate_padded, pad_id=pad),
        )

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross entropy over the micro-batch's learned tokens; the lm_head runs only there."""
        return model(
            batch["idx"],
            batch["targets"],
            positions=batch.get("positions"),
            segments=batch.get("segments"),
            labelled_only=True,
        ), {}

    def items_in(self, batch: Any) -> int:
        return int(batch["tokens"])

    def synthetic_batch(self, batch_size: int) -> Any:
        gen = torch.Generator().manual_seed(0)
        lengths = [int(n) for n in torch.randint(8, self.seq_len + 2, (4 * batch_size,), generator=gen)]
        examples = [
            Example(torch.randint(0, self.vocab_size, (n,), generator=gen).numpy(), np.arange(n) % 3 > 0)
            for n in lengths
        ]
        if not self.packing:  # the micro-batch length buckets make: neighbours in length, padded to the longest
            start = (len(examples) - batch_size) // 2  # the median lengths
            examples = sorted(examples, key=lambda ex: ex.inputs)[start : start + batch_size]
            padded = PaddedConversations(examples, 0)
            return collate_padded([padded[i] for i in range(len(padded))], 0)
        rows = PackedRows(examples, self.seq_len, 0)
        return collate_packed([rows[i % len(rows)] for i in range(batch_size)])

    # --- evaluation ---------------------------------------------------------------------------
    def _val_batch(self, items: list[int]) -> Any:
        return collate_packed([self.val_set[j] for j in items])  # the loss is the same packed or not

    def _learned_tokens(self, batch: Any) -> int | torch.Tensor:
        return (batch["targets"] != -100).sum()

    def _prompts(self) -> list[tuple[list[dict[str, str]], str, str]]:
        """(messages before the last reply, the reference reply, kind) of each held-out conversation."""
        out = []
        for c in self.chat.val_conversations:
            last = max((i for i, m in enumerate(c.messages) if m["role"] == "assistant"), default=None)
            if last is not None and last > 0:
                out.append((c.messages[:last], c.messages[last]["content"], str(c.extra.get("kind") or "")))
        return out

    def _reply(self, model: nn.Module, ids: list[int], device: torch.device, **sampling: Any) -> str:
        """A reply of exactly reply_tokens forward calls (the same count on every rank), cut at the template's
        end-of-turn token (Gemma's <end_of_turn>, Phi's <|end|>) or EOS, whichever comes first."""
        out = model.generate(torch.tensor([ids], device=device), self.reply_tokens, **sampling)[0, len(ids) :]
        new = out.tolist()
        stops = {self.tokenizer.eos_id, *self.chat.encoder.end_of_turn_ids} - {None}
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        return self.tokenizer.decode(new[:cut]).strip()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> EvalResult:
        was_training = model.training
        model.eval()
        try:
            loss = self._val_loss(model, device)
            rank, world = self.dist.rank, self.dist.world_size
            stats = torch.zeros(4, dtype=torch.float64, device=device)  # persona hits, asked; leaks, others
            # Replies: greedy for the persona counts, every rank its share; a short shard's extra calls are
            # not counted (under FSDP each forward is collective, so every rank makes as many).
            prompts = self._prompts()
            persona = re.compile(rf"\b{re.escape(self.persona)}\b", re.IGNORECASE) if self.persona else None
            replies: dict[int, str] = {}
            if persona is not None and prompts:
                shard = list(eval_shard(len(prompts), rank, world))
                for k in range(eval_batch_count(len(prompts), world, 1)):
                    i = shard[k] if k < len(shard) else 0
                    reply = self._reply(model, self.chat.encoder.prompt_ids(prompts[i][0]), device, temperature=0.0)
                    if k < len(shard):
                        replies[i] = reply
                        hit = persona.search(reply) is not None
                        identity = prompts[i][2] == "identity"
                        stats[0 if identity else 2] += hit
                        stats[1 if identity else 3] += 1
            hits, asked, leaks, others = all_reduce_sum(stats).tolist()
            # Sampled replies to held-out prompts spread over the set (identity and ordinary ones), with a local
            # generator (the global RNG stays put).
            gen = torch.Generator(device=device).manual_seed(0)
            lines = []
            picked = sorted(set(np.linspace(0, len(prompts) - 1, self.num_samples).round().astype(int).tolist()))
            for messages, reference, _ in [prompts[i] for i in picked] if prompts and self.num_samples else []:
                ids = self.chat.encoder.prompt_ids(messages)
                reply = self._reply(model, ids, device, temperature=0.7, top_k=40, generator=gen)
                lines.append(f"**{messages[-1]['content']}**\n\n{reply}\n\n(reference: {reference})")
        finally:
            model.train(was_training)
        scalars = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        if asked:
            scalars["val/persona_rate"] = hits / asked
        if others:
            scalars["val/persona_leak"] = leaks / others
        return EvalResult(scalars=scalars, texts={"samples/replies": "\n\n---\n\n".join(lines)} if lines else {})

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "sft": {"train_on": self.chat.encoder.train_on, "packing": self.packing}}
