"""The chat templates of this year's model families, stored byte-exact in tests/data/chat_templates (SOURCES.md
says where each came from): abi_train renders them as transformers' ``apply_chat_template`` does, template
variables (``enable_thinking``) reach the renderer from ``data.chat_template_kwargs``, and the SFT mask learns
each assistant turn as the template renders the whole conversation, up to the family's end-of-turn token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import compose_cfg
from transformers import PreTrainedTokenizerFast

from abi_train.data.sft import ChatEncoder, open_chat
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    bos: str | None  # bos_token and eos_token as the model's tokenizer_config.json names them
    eos: str
    end_of_turn: str
    system: bool = True  # Gemma 2 refuses a system message
    thinking: bool = False  # takes enable_thinking and <think> blocks


FAMILIES = {
    "qwen3-0.6b": Family(None, "<|im_end|>", "<|im_end|>", thinking=True),
    "qwen3-8b": Family(None, "<|im_end|>", "<|im_end|>", thinking=True),
    "smollm3-3b": Family(None, "<|im_end|>", "<|im_end|>", thinking=True),
    "gemma-3-1b-it": Family("<bos>", "<eos>", "<end_of_turn>"),
    "gemma-2-2b-it": Family("<bos>", "<eos>", "<end_of_turn>", system=False),
    "phi-4-mini-instruct": Family("<|endoftext|>", "<|endoftext|>", "<|end|>"),
    "phi-3-mini-4k-instruct": Family("<s>", "<|endoftext|>", "<|end|>"),
    "mistral-7b-instruct-v0.3": Family("<s>", "</s>", "</s>"),
}
SPECIALS = (
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "[INST]", "[/INST]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)  # fmt: skip

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, 6."},
]
THINKING = [  # replies with their reasoning, as Qwen3 and SmolLM3 write them
    CHAT[0],
    {"role": "assistant", "content": "<think>\nLet me add.\n</think>\n\nIt is 4."},
    CHAT[2],
    {"role": "assistant", "content": "<think>\nDouble 3.\n</think>\n\nSix, 6."},
]
NO_THINK = [{"role": "system", "content": "Be brief. /no_think"}, *CHAT]  # SmolLM3's system flag


def conversations(family: Family) -> dict[str, list[dict[str, str]]]:
    system = [SYSTEM] if family.system else []
    convs = {"single": [*system, *CHAT[:2]], "multi": [*system, *CHAT]}
    return convs | ({"thinking": THINKING, "no_think": NO_THINK} if family.thinking else {})


@cache
def base_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE with every family's special tokens (one token each, as in the real vocabularies)."""
    return Tokenizer.train(
        ["What is 2+2? It is 4. And 3+3? Six, 6. Be brief. Let me add. Double 3."] * 20, 320, SPECIALS
    )


def tokenizers(name: str) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    """abi_train's tokenizer and transformers' over the same vocabulary, with the family's BOS and EOS."""
    family, hf = FAMILIES[name], base_tokenizer().hf
    specials = {"bos_token": family.bos, "eos_token": family.eos}
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, **{k: v for k, v in specials.items() if v})
    return Tokenizer(hf, eos=family.eos, bos=family.bos), fast


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def render_cases() -> list[Any]:
    cases = []
    for name, family in FAMILIES.items():
        thinking = [{}, {"enable_thinking": True}, {"enable_thinking": False}] if family.thinking else [{}]
        for conv, messages in conversations(family).items():
            for gen in (False, True):
                for kwargs in thinking:
                    case_id = f"{name}-{conv}-{'prompt' if gen else 'whole'}-{json.dumps(kwargs)}"
                    cases.append(pytest.param(name, messages[:-1] if gen else messages, gen, kwargs, id=case_id))
    return cases


def test_every_stored_template_is_checked() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(FAMILIES)


@pytest.mark.parametrize(("name", "messages", "gen", "kwargs"), render_cases())
def test_renders_as_transformers(name: str, messages: list[dict[str, str]], gen: bool, kwargs: dict) -> None:
    tok, fast = tokenizers(name)
    want = fast.apply_chat_template(
        messages, chat_template=template(name), tokenize=False, add_generation_prompt=gen, **kwargs
    )
    assert ChatEncoder(tok, template(name), template_kwargs=kwargs).render(messages, gen) == want


def test_enable_thinking_and_gemma2_system_refusal() -> None:
    tok, _ = tokenizers("qwen3-0.6b")
    for name in ("qwen3-0.6b", "smollm3-3b"):  # the switch changes the generation prompt: it reached the template
        on, off = (ChatEncoder(tok, template(name), template_kwargs={"enable_thinking": v}) for v in (True, False))
        assert off.render(CHAT[:1], True).rstrip().endswith("</think>")
        assert not on.render(CHAT[:1], True).rstrip().endswith("</think>")
    with pytest.raises(UserError, match="chat template: System role not supported"):
        ChatEncoder(tokenizers("gemma-2-2b-it")[0], template("gemma-2-2b-it")).render([SYSTEM, *CHAT], False)
    with pytest.raises(UserError, match="data.chat_template_kwargs cannot set add_generation_prompt"):
        ChatEncoder(tok, template("qwen3-0.6b"), template_kwargs={"add_generation_prompt": False})


def learned(tok: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each run of labelled tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]


# What the mask learns of CHAT (with the system message where the template takes one): each reply as the
# template renders it after the generation prompt, and the end-of-turn token, not the EOS Phi appends.
PLAIN = {
    "gemma-3-1b-it": ["It is 4.<end_of_turn>", "Six, 6.<end_of_turn>"],
    "gemma-2-2b-it": ["It is 4.<end_of_turn>", "Six, 6.<end_of_turn>"],
    "phi-4-mini-instruct": ["It is 4.<|end|>", "Six, 6.<|end|>"],
    "phi-3-mini-4k-instruct": ["It is 4.<|end|>", "Six, 6.<|end|>"],
    # The space before the content is the template's and the model's ("[/INST] It"), also for the first
    # reply, whose prefix renders differently (the system prompt moves to the last user turn).
    "mistral-7b-instruct-v0.3": [" It is 4.</s>", " Six, 6.</s>"],
    "smollm3-3b": ["It is 4.<|im_end|>", "Six, 6.<|im_end|>"],
}
# Qwen3 renders the last reply with its (here empty) <think> block, earlier ones without.
QWEN3 = {
    ("multi", False): ["It is 4.<|im_end|>", "<think>\n\n</think>\n\nSix, 6.<|im_end|>"],
    ("multi", True): ["It is 4.<|im_end|>", "Six, 6.<|im_end|>"],  # the empty block is in the prompt
    ("thinking", False): ["It is 4.<|im_end|>", "<think>\nDouble 3.\n</think>\n\nSix, 6.<|im_end|>"],
}
# SmolLM3 keeps reasoning in every reply; without thinking the empty block is the prompt's.
SMOLLM3_THINKING = [
    "<think>\nLet me add.\n</think>\n\nIt is 4.<|im_end|>",
    "<think>\nDouble 3.\n</think>\n\nSix, 6.<|im_end|>",
]
MASK_CASES = [
    *[pytest.param(name, "multi", {}, want, id=name) for name, want in PLAIN.items()],
    *[
        pytest.param(q, conv, {"enable_thinking": False} if off else {}, want, id=f"{q}-{conv}-off={off}")
        for q in ("qwen3-0.6b", "qwen3-8b")
        for (conv, off), want in QWEN3.items()
    ],
    pytest.param("smollm3-3b", "multi", {"enable_thinking": False}, PLAIN["smollm3-3b"], id="smollm3-3b-off"),
    pytest.param("smollm3-3b", "no_think", {}, PLAIN["smollm3-3b"], id="smollm3-3b-no_think"),
    pytest.param("smollm3-3b", "thinking", {}, SMOLLM3_THINKING, id="smollm3-3b-thinking"),
]


@pytest.mark.parametrize(("name", "conv", "kwargs", "want"), MASK_CASES)
def test_mask_learns_each_reply_and_its_end_of_turn(name: str, conv: str, kwargs: dict, want: list[str]) -> None:
    tok, fast = tokenizers(name)
    messages = conversations(FAMILIES[name])[conv]
    encoder = ChatEncoder(tok, template(name), "assistant", kwargs)
    assert encoder.end_of_turn == FAMILIES[name].end_of_turn
    assert encoder.end_of_turn_ids == [tok.hf.token_to_id(FAMILIES[name].end_of_turn)]  # where replies stop
    ids, mask = encoder.encode(messages)
    # The tokens are those of transformers' rendering of the whole conversation.
    whole = fast.apply_chat_template(messages, chat_template=template(name), tokenize=False, **kwargs)
    assert ids.tolist() == tok.encode(whole)
    assert learned(tok, ids, mask) == want
    ids, mask = ChatEncoder(tok, template(name), "last", kwargs).encode(messages)
    assert learned(tok, ids, mask) == want[-1:]


def test_data_chat_template_kwargs_reach_every_rendering(tmp_path: Path) -> None:
    rows = "".join(json.dumps({"messages": m}) + "\n" for m in (CHAT[:2], CHAT[2:]))
    (tmp_path / "chats.jsonl").write_text(rows)
    (tmp_path / "qwen3.jinja").write_text(template("qwen3-0.6b"))
    cfg = compose_cfg(
        [
            "recipe=sft",
            f"data.files={tmp_path / 'chats.jsonl'}",
            f"data.val_files={tmp_path / 'chats.jsonl'}",
            f"data.chat_template={tmp_path / 'qwen3.jinja'}",
            "+data.chat_template_kwargs.enable_thinking=false",
        ]
    )
    tok = tokenizers("qwen3-0.6b")[0]
    chat = open_chat(cfg.data, tok)
    assert tok.decode(chat.encoder.prompt_ids(CHAT[:1])).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert learned(tok, chat.train[1].ids, chat.train[1].mask) == ["Six, 6.<|im_end|>"]
