"""Chat data for supervised fine-tuning (``data=chat``): conversations from local files, rendered with the
chat template, labelled on the assistant's tokens, packed or padded into batches.

Formats (``data.format``, or ``auto``: told apart by their columns):

  messages           ``messages``: [{role, content}, ...] (OpenAI)
  sharegpt           ``conversations``: [{from: system | human | gpt, value}, ...]
  alpaca             ``instruction``, ``output`` (``input``, optional, is appended to the instruction)
  prompt_completion  ``prompt``, ``completion``: strings, or lists of messages (TRL's conversational form)

Other columns are kept with the row (the persona set's ``kind`` marks its identity questions).

Which tokens are the assistant's, without needing ``{% generation %}`` tags (most templates have none): each
assistant turn as the template renders the whole conversation. Its content is the part of the rendering that
changes when that message's content is swapped for a placeholder; the turn ends with the template's
end-of-turn text, found once by rendering a placeholder reply alone and followed by a user turn and keeping
the tokens both put after it (``<|im_end|>``, Gemma's ``<end_of_turn>``, Phi's ``<|end|>``, Mistral's EOS
``</s>``; Phi's templates put an EOS after the last turn, which is not part of it). The turn starts where
``render(messages[:i], add_generation_prompt=True)`` ends when that is a prefix of the whole, so what the
template puts between the header and the content (Qwen3's ``<think>`` block) is learned too; templates that
render earlier turns differently once later ones follow (Qwen3 drops the reasoning of earlier replies, Mistral
moves the system prompt into the last user turn) start it at the content, or before the text the template puts
ahead of every reply's content when that is there (Mistral's space). The tokens that overlap a turn's
characters (offsets into the whole text) are labelled, the end-of-turn token included: the model learns to
stop. ``data.chat_template_kwargs`` are passed to every rendering (``enable_thinking`` for Qwen3, SmolLM3).

Batches: ``packing: true`` lays several conversations into each row of ``seq_len`` tokens (first fit by
decreasing length) with ``segments`` (attention stays inside a conversation) and ``positions`` restarting
at 0, which ``GPT.forward`` takes; ``packing: false`` pads each micro-batch to its longest conversation,
with the conversations of a window of steps sorted by length first (length buckets) to waste less.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from abi_train.data.chat import render_chat
from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# What each format needs, for the error lines.
NEEDS = {
    "messages": "'messages' (a list of {role, content})",
    "sharegpt": "'conversations' (a list of {from, value})",
    "alpaca": "'instruction' and 'output' (and optionally 'input')",
    "prompt_completion": "'prompt' and 'completion'",
}
TRAIN_ON = ("assistant", "all", "last")
OVERLONG = ("truncate", "skip")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SUFFIXES = (".jsonl", ".json", ".parquet")
PERSONA_DIR = Path(__file__).parent / "persona"  # the shipped default set (scripts/make_persona_data.py)
# Stands in for a reply's content to find where the template puts it: a private-use character, which no
# template strips and real text does not hold.
PLACEHOLDER = "\ue000"
RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")  # render_chat's own arguments


# --- rows -> conversations -------------------------------------------------------------------------
def detect_format(columns: Sequence[str], where: str) -> str:
    """The format whose columns ``columns`` holds; none (or two) is one line naming the columns."""
    cols = set(columns)
    found = [
        f
        for f, needed in (
            ("messages", {"messages"}),
            ("sharegpt", {"conversations"}),
            ("alpaca", {"instruction", "output"}),
            ("prompt_completion", {"prompt", "completion"}),
        )
        if needed <= cols
    ]
    if len(found) != 1:
        what = "match no chat format" if not found else f"match several chat formats ({', '.join(found)})"
        needs = "; ".join(f"{f} needs {n}" for f, n in NEEDS.items())
        raise UserError(f"{where}: its columns {sorted(cols)} {what}: {needs}; or set data.format")
    return found[0]


def _missing(where: str, fmt: str, row: dict[str, Any], detail: str) -> UserError:
    present = sorted(k for k, v in row.items() if v is not None)
    return UserError(f"{where}: {detail}; data.format={fmt} needs {NEEDS[fmt]}, the row has columns {present}")


def _check_messages(messages: Any, where: str, fmt: str, row: dict[str, Any]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _missing(where, fmt, row, "no messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _missing(where, fmt, row, f"a message without a string role and content ({m!r:.80})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """One row of format ``fmt`` as [{role, content}, ...]; a row without what the format needs: one line."""
    if fmt == "messages":
        return _check_messages(row.get("messages"), where, fmt, row)
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise _missing(where, fmt, row, "no conversations")
        messages = []
        for t in turns:
            role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise _missing(
                    where, fmt, row, f"a turn without from ({' | '.join(SHAREGPT_ROLES)}) and value ({t!r:.80})"
                )
            messages.append({"role": role, "content": t["value"]})
        return messages
    if fmt == "alpaca":
        instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input")
        if not isinstance(instruction, str) or not isinstance(output, str) or not instruction:
            raise _missing(where, fmt, row, "no instruction or output")
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return _check_messages(prompt + completion, where, fmt, row)
        if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt:
            raise _missing(where, fmt, row, "no prompt or completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise UserError(f"data.format={fmt!r} is not valid; choose one of: auto, {', '.join(FORMATS)}")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns (e.g. kind)


def resolve_chat_files(files: Any, key: str) -> list[Path]:
    """A path, glob or list of them -> existing .jsonl/.json/.parquet files (text.resolve_files' rules)."""
    from abi_train.data.text import resolve_files

    paths = resolve_files(OmegaConf.to_container(files) if OmegaConf.is_config(files) else files)
    for p in paths:
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"data.{key}: {p} is not chat data; accepted: {', '.join(SUFFIXES)}")
    return paths


def read_conversations(paths: list[Path], fmt: str, key: str = "files") -> list[Conversation]:
    """Every row of ``paths`` (read with HF ``datasets``, local files only) as a Conversation."""
    import datasets

    datasets.disable_progress_bars()
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format={fmt!r} is not valid; choose one of: auto, {', '.join(FORMATS)}")
    out: list[Conversation] = []
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors become our one line
    try:
        for path in paths:
            builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
            try:
                ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
            except Exception as e:  # malformed files surface as assorted arrow/datasets errors
                raise UserError(f"data.{key}: could not read {path}: {str(e.__cause__ or e).splitlines()[0]}") from None
            file_fmt = detect_format(ds.column_names, f"data.{key}: {path}") if fmt == "auto" else fmt
            used = {"messages", "conversations", "instruction", "input", "output", "prompt", "completion"}
            for i, row in enumerate(ds.to_list()):
                messages = to_messages(row, file_fmt, f"data.{key}: {path} row {i}")
                out.append(Conversation(messages, {k: v for k, v in row.items() if k not in used}))
    finally:
        datasets.logging.set_verbosity(verbosity)
    return out


# --- rendering and the assistant mask --------------------------------------------------------------
def resolve_template(value: str | None, tokenizer: Tokenizer, origin: str) -> str:
    """``data.chat_template`` (a Jinja string or a file path) or else the tokenizer's; none: one line."""
    if value:
        if "{{" in value or "{%" in value:
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template={value!r} is neither a Jinja template nor an existing file")
        return path.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise UserError(
            f"data=chat needs a chat template and the tokenizer of {origin} has none; "
            "set data.chat_template to a Jinja string or a .jinja file"
        )
    return tokenizer.chat_template


class ChatEncoder:
    """Renders conversations with one template and tokenizer (and the template's extra variables, e.g.
    ``enable_thinking``) and labels their tokens (``train_on``)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        train_on: str = "assistant",
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if train_on not in TRAIN_ON:
            raise UserError(f"data.train_on={train_on!r} is not valid; choose one of: {', '.join(TRAIN_ON)}")
        clash = sorted(set(template_kwargs or {}) & set(RESERVED))
        if clash:
            raise UserError(f"data.chat_template_kwargs cannot set {', '.join(clash)}: the renderer passes them")
        self.tokenizer, self.template, self.train_on = tokenizer, template, train_on
        name = tokenizer.hf.id_to_token
        self.variables = {"bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id)}
        self.variables |= dict(template_kwargs or {})

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(self.template, messages, add_generation_prompt, **self.variables)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation so far plus the header of the assistant's reply, as generation starts from it."""
        return self.tokenizer.encode(self.render(messages, True))

    @cached_property
    def _around_reply(self) -> tuple[str, str]:
        """What the template writes around an assistant reply's content, from a placeholder reply rendered
        alone and followed by a user turn: the text between the generation prompt and the content (Qwen3's
        empty ``<think>`` block, Mistral's space), and the end-of-turn text (see ``end_of_turn``)."""
        user = {"role": "user", "content": "Hi"}
        reply = [user, {"role": "assistant", "content": PLACEHOLDER}]
        prompt, alone, followed = (
            self.render([user], True),
            self.render(reply, False),
            self.render([*reply, user], False),
        )
        if PLACEHOLDER not in alone or PLACEHOLDER not in followed:
            raise UserError("the chat template does not render an assistant reply's content; set data.train_on=all")
        lead = alone[len(prompt) : alone.index(PLACEHOLDER)] if alone.startswith(prompt) else ""
        afters = []
        for text in (alone, followed):
            after = text[text.index(PLACEHOLDER) + len(PLACEHOLDER) :]
            enc = self.tokenizer.hf.encode(after, add_special_tokens=False)
            afters.append([(tok, after[a:b]) for tok, (a, b) in zip(enc.ids, enc.offsets, strict=True)])
        common = os.path.commonprefix(afters)  # whole tokens: <|end|><|endoftext|> and <|end|><|user|> share "<|"
        return lead, "".join(piece for _, piece in common).rstrip()

    @property
    def end_of_turn(self) -> str:
        """The text the template writes after an assistant reply's content and before the next turn, trailing
        whitespace dropped (``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``): the tokens that follow a
        reply both when it ends the conversation and when a user turn follows (alone, Phi's templates add an
        EOS; followed, the next turn's header)."""
        return self._around_reply[1]

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The end-of-turn text as token ids when it is one token (where generation stops), else none."""
        ids = self.tokenizer.hf.encode(self.end_of_turn, add_special_tokens=False).ids if self.end_of_turn else []
        return ids if len(ids) == 1 else []

    def assistant_spans(
        self, messages: list[dict[str, str]], full: str, last_only: bool = False
    ) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in ``full`` (the whole rendering), each from the start of the
        reply to the end of its end-of-turn text; ``last_only``: the final assistant turn only."""
        turns = list(enumerate([i for i, m in enumerate(messages) if m["role"] == "assistant"], 1))  # (n, index)
        spans = []
        for n, i in turns[-1:] if last_only else turns:
            swapped = self.render([*messages[:i], {**messages[i], "content": PLACEHOLDER}, *messages[i + 1 :]], False)
            if swapped == full:
                raise UserError(
                    f"the chat template leaves assistant turn {n} out of the conversation it renders, so its "
                    "tokens cannot be learned; set data.train_on=all or another data.chat_template"
                )
            start = len(os.path.commonprefix([full, swapped]))
            end = len(full) - len(os.path.commonprefix([full[start:][::-1], swapped[start:][::-1]]))
            if not full.startswith(self.end_of_turn, end):
                raise UserError(
                    f"the chat template ends assistant turn {n} with {full[end : end + 20]!r}, not "
                    f"its end-of-turn text {self.end_of_turn!r}; set data.train_on=all or another data.chat_template"
                )
            # The reply starts where the generation prompt ends, when the template renders the turns before it
            # the same way without the later ones; else (Mistral's system prompt moves to the last user turn)
            # with what the template writes before a reply's content, when it is there.
            prompt, lead = self.render(messages[:i], True), self._around_reply[0]
            if full.startswith(prompt) and len(prompt) <= start:
                start = len(prompt)
            elif full.endswith(lead, 0, start):
                start -= len(lead)
            spans.append((start, end + len(self.end_of_turn)))
        return spans

    def encode(self, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the whole conversation and a boolean mask of the tokens to learn (``train_on``)."""
        full = self.render(messages, False)
        enc = self.tokenizer.hf.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if self.train_on == "all":
            return ids, np.ones(len(ids), dtype=bool)
        starts = np.asarray([s for s, _ in enc.offsets], dtype=np.int64)
        ends = np.asarray([e for _, e in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in self.assistant_spans(messages, full, last_only=self.train_on == "last"):
            # A token overlapping the turn, as transformers' char_to_token does: Mistral's "▁Hello" starts at
            # the space the template puts before the content.
            mask |= (starts < b) & (ends > a) & (ends > starts)
        return ids, mask


# --- examples, overlong, packing -------------------------------------------------------------------
@dataclass
class Example:
    ids: np.ndarray  # int64 token ids of the whole conversation
    mask: np.ndarray  # bool, True where the token is learned (as a target)

    @property
    def inputs(self) -> int:
        """Tokens the model reads: all but the last (which is only a target)."""
        return len(self.ids) - 1


def fit_length(examples: list[Example], seq_len: int, overlong: str, split: str) -> tuple[list[Example], int, int]:
    """Examples that fit ``seq_len`` model inputs: longer ones truncated or skipped (``overlong``); one that
    keeps no labelled target is skipped. Returns (kept, truncated, skipped)."""
    if overlong not in OVERLONG:
        raise UserError(f"data.overlong={overlong!r} is not valid; choose one of: {', '.join(OVERLONG)}")
    kept, truncated, skipped = [], 0, 0
    for ex in examples:
        cut = ex.inputs > seq_len
        if cut and overlong == "skip":
            skipped += 1
            continue
        if cut:
            ex = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1])
        if len(ex.ids) < 2 or not ex.mask[1:].any():  # nothing left to learn (e.g. the reply was cut off)
            skipped += 1
            continue
        truncated += cut
        kept.append(ex)
    if not kept:
        longest = max((ex.inputs for ex in examples), default=0)
        raise UserError(
            f"every {split} conversation ({len(examples)}) is longer than data.seq_len={seq_len} tokens or has "
            f"no token to learn (longest: {longest}); raise data.seq_len"
            + (" or set data.overlong=truncate" if overlong == "skip" else "")
        )
    return kept, truncated, skipped


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Group item indices into rows of at most ``seq_len`` tokens: first fit by decreasing length
    (deterministic; rows in the order they were opened)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def targets_of(ex: Example) -> np.ndarray:
    """The next-token targets of ``ex``'s inputs, -100 where the token is not learned."""
    return np.where(ex.mask[1:], ex.ids[1:], -100)


class PackedRows(Dataset):
    """Rows of ``seq_len`` tokens, each several whole conversations (item = row)."""

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int) -> None:
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.rows = pack([ex.inputs for ex in examples], seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.seq_len
        idx = np.full(t, self.pad_id, dtype=np.int64)
        tgt = np.full(t, -100, dtype=np.int64)
        pos = np.arange(t, dtype=np.int64)  # padding: positions continue, in a segment of its own
        seg = np.full(t, len(self.rows[i]), dtype=np.int64)
        at = 0
        for s, j in enumerate(self.rows[i]):
            ex = self.examples[j]
            n = ex.inputs
            idx[at : at + n], tgt[at : at + n] = ex.ids[:-1], targets_of(ex)
            pos[at : at + n], seg[at : at + n] = np.arange(n), s
            at += n
        pos[at:] = np.arange(t - at)
        return {
            "idx": torch.from_numpy(idx),
            "targets": torch.from_numpy(tgt),
            "positions": torch.from_numpy(pos),
            "segments": torch.from_numpy(seg),
            "tokens": torch.tensor(at),  # real (non-pad) tokens, the throughput unit
        }


class PaddedConversations(Dataset):
    """One conversation per item; ``collate_padded`` pads a micro-batch to its longest."""

    def __init__(self, examples: list[Example], pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ex = self.examples[i]
        return ex.ids[:-1], targets_of(ex)


def collate_packed(rows: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: torch.stack([r[k] for r in rows]) for k in ("idx", "targets", "positions", "segments")}
    out["tokens"] = int(sum(int(r["tokens"]) for r in rows))  # host-side: Task.items_in reads it without a sync
    return out


def collate_padded(items: list[tuple[np.ndarray, np.ndarray]], pad_id: int, multiple: int = 8) -> dict:
    """Right-padded (idx, targets) to the longest item, rounded up to ``multiple``: causal attention never
    lets a real token see the padding after it, so no mask is needed."""
    t = max(len(i) for i, _ in items)
    t = -(-t // multiple) * multiple
    idx = torch.full((len(items), t), pad_id, dtype=torch.long)
    tgt = torch.full((len(items), t), -100, dtype=torch.long)
    for r, (i, y) in enumerate(items):
        idx[r, : len(i)], tgt[r, : len(y)] = torch.from_numpy(i), torch.from_numpy(y)
    return {"idx": idx, "targets": tgt, "tokens": sum(len(i) for i, _ in items)}


class LengthBuckets:
    """Micro-batches of a GlobalBatchSampler regrouped by length: the indices of a window of ``window`` steps
    (aligned to absolute step numbers, so a resumed run sees the same batches) are sorted by length and cut
    into the window's micro-batches in order, which the window then visits in a fixed shuffled order."""

    def __init__(self, sampler: GlobalBatchSampler, lengths: Sequence[int], window: int = 16) -> None:
        self.sampler, self.lengths, self.window = sampler, lengths, window

    def __iter__(self) -> Iterator[list[int]]:
        s, micro = self.sampler, self.sampler.accumulation
        first = s.start_step - s.start_step % self.window
        for w in range(first, 10**12, self.window):
            slots = [(step, m) for step in range(w, w + self.window) for m in range(micro)]
            pooled = sorted((i for step, m in slots for i in s.indices(step, m)), key=lambda i: self.lengths[i])
            chunks = [pooled[k * s.local_batch : (k + 1) * s.local_batch] for k in range(len(slots))]
            order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(s.seed + w)).tolist()
            for k, (step, _) in enumerate(slots):
                if step >= s.start_step:
                    yield chunks[order[k]]


# --- the data=chat opener --------------------------------------------------------------------------
@dataclass
class ChatData:
    """SFT data: encoded train/val conversations, the validation conversations themselves (for replies),
    the encoder (template + tokenizer) and what fitting them to seq_len did."""

    train: list[Example]
    val: list[Example]
    val_conversations: list[Conversation]
    encoder: ChatEncoder
    report: str


def open_chat(d: DictConfig, tokenizer: Tokenizer | None = None, origin: str = "the run") -> ChatData:
    """The ``data=chat`` opener (abi_train.data.SOURCES): read, render, label and fit the conversations."""
    if tokenizer is None:
        raise UserError("data=chat needs a tokenizer: set init_from (a chat model) or data.tokenizer")
    seq_len, fmt = int(d.seq_len), str(d.get("format") or "auto")
    template = resolve_template(d.get("chat_template"), tokenizer, origin)
    kwargs = d.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise UserError(
            f"data.chat_template_kwargs must be a mapping of template variables (e.g. "
            f"+data.chat_template_kwargs.enable_thinking=false), not {kwargs!r}"
        )
    kwargs = OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs) else dict(kwargs)
    encoder = ChatEncoder(tokenizer, template, str(d.get("train_on") or "assistant"), kwargs)
    if d.get("files") is None:  # the shipped persona set
        train = read_conversations([PERSONA_DIR / "train.jsonl"], "messages")
        val = read_conversations([PERSONA_DIR / "val.jsonl"], "messages", "val_files")
    else:
        train = read_conversations(resolve_chat_files(d.files, "files"), fmt)
        if d.get("val_files") is not None:
            val = read_conversations(resolve_chat_files(d.val_files, "val_files"), fmt, "val_files")
        else:
            fraction = float(d.get("val_fraction") or 0.0)
            if not 0.0 < fraction < 1.0:
                raise UserError(f"data.val_fraction={fraction} must be in (0, 1) when data.val_files is null")
            order = np.random.default_rng(0).permutation(len(train))  # a fixed, spread-out held-out set
            n_val = max(1, round(fraction * len(train)))
            if n_val >= len(train):
                raise UserError(f"data.files holds {len(train)} conversation(s): too few to hold out a validation set")
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
    overlong = str(d.get("overlong") or "truncate")
    parts = []
    out = {}
    for split, convs in (("training", train), ("validation", val)):
        encoded = [Example(*encoder.encode(c.messages)) for c in convs]
        kept, truncated, skipped = fit_length(encoded, seq_len, overlong, split)
        out[split] = kept
        tokens = sum(ex.inputs for ex in kept)
        labelled = sum(int(ex.mask[1:].sum()) for ex in kept)
        parts.append(
            f"{split} {len(kept)} conversations ({tokens} tokens, {labelled} learned; "
            f"{truncated} truncated, {skipped} skipped at seq_len {seq_len})"
        )
    report = "data: " + "; ".join(parts)
    return ChatData(out["training"], out["validation"], val, encoder, report)
