"""python -m abi_train.generate PATH [--prompt "..."] [--chat --system "..."] [--max-new-tokens 64 --temperature 0.8
--top-k 50 --seed 0 --device auto]: continue a prompt (or answer it, with the model's chat template) with an LLM.

PATH is anything ``init_from`` takes: an abi_train run dir or checkpoint, a Hugging Face model folder or a
GGUF file. Tokens are printed as they are generated; generation stops at the tokenizer's EOS. ``--chat``
without ``--prompt`` is a conversation on the terminal: each turn is answered with the whole conversation
so far as the prompt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from abi_train.cli import run_cli
from abi_train.data.chat import render_chat
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.models import build_model
from abi_train.sources import load_pretrained
from abi_train.utils import pick_device
from abi_train.weights import load_pretrained_weights

EXAMPLES = """examples:
  python -m abi_train.generate runs/llm/my_run --prompt "Once upon a time"
  python -m abi_train.generate runs/sft/my_run --chat          (a conversation on the terminal; Ctrl-D ends it)
  python -m abi_train.generate SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "What is the capital of France?" \\
      --temperature 0
  python -m abi_train.generate path/to/hf_model_folder --chat --system "Answer briefly." --prompt "Why is the sky blue?"
"""


def load_lm(path: str, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """An LLM and its tokenizer from any init_from source, in eval mode on ``device``."""
    pretrained = load_pretrained(path)
    arch = pretrained.model_config.get("arch")
    if arch != "gpt":
        raise UserError(f"{path} is not an LLM checkpoint (arch {arch!r}); generation needs an LLM (arch 'gpt')")
    if pretrained.tokenizer is None:
        raise UserError(f"{path} has no tokenizer; generation needs one")
    model = build_model(pretrained.model_config)
    load_pretrained_weights(model, pretrained)
    return model.to(device).eval(), pretrained.tokenizer


def chat_template(tokenizer: Tokenizer) -> str:
    if not tokenizer.chat_template:
        raise UserError("--chat needs a chat template, and this model's tokenizer has none; drop --chat")
    return tokenizer.chat_template


def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation rendered with the tokenizer's template, ending with the header of the assistant's reply."""
    name = tokenizer.hf.id_to_token
    text = render_chat(chat_template(tokenizer), messages, True, name(tokenizer.bos_id), name(tokenizer.eos_id))
    return tokenizer.encode(text)  # the template writes BOS itself when the model wants it


def chat_prompt(tokenizer: Tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The prompt as one user turn (after an optional system turn), rendered with the tokenizer's template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tokenizer, messages)


def stream_tokens(
    model: nn.Module,
    ids: list[int],
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> Iterator[int]:
    """New token ids one at a time (the model's own sampling with its KV cache), stopping at EOS."""
    device = next(model.parameters()).device
    for token in model.stream(torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, generator):
        nxt = int(token[0, 0])
        if nxt == eos_id:
            return
        yield nxt


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k <= 0):
        raise UserError("--temperature and --max-new-tokens must be >= 0, --top-k > 0")


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The text generated after ``ids``; ``on_text`` receives it as it comes (whole characters only)."""
    new: list[int] = []
    shown = ""
    for token in stream_tokens(model, ids, tokenizer.eos_id, max_new_tokens, temperature, top_k, generator):
        new.append(token)
        text = tokenizer.decode(new)
        if on_text and not text.endswith("\ufffd"):  # a character split across byte tokens: wait for the rest
            on_text(text[len(shown) :])
            shown = text
    text = tokenizer.decode(new)
    if on_text and text != shown:
        on_text(text[len(shown) :])
    return text


def generate_text(
    path: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "auto",
    chat: bool = False,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Without ``chat``: the prompt followed by its continuation; with it: the model's answer. ``on_text``
    receives the text as it is generated (whole characters only)."""
    check_sampling(max_new_tokens, temperature, top_k)
    if system and not chat:
        raise UserError("--system is for --chat")
    dev = pick_device(device)
    model, tokenizer = load_lm(path, dev)
    ids = chat_prompt(tokenizer, prompt, system) if chat else tokenizer.encode_prompt(prompt)
    head = "" if chat else prompt
    if on_text and head:
        on_text(head)
    generator = torch.Generator(device=dev).manual_seed(seed)
    return head + stream_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, generator, on_text)


def chat_session(
    path: str,
    read_turn: Callable[[], str | None],
    on_text: Callable[[str], None],
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "auto",
    system: str | None = None,
) -> list[dict[str, str]]:
    """A conversation: each user turn from ``read_turn`` (None ends it) is answered with the whole conversation
    so far as the prompt, streamed to ``on_text``; returns the messages."""
    check_sampling(max_new_tokens, temperature, top_k)
    dev = pick_device(device)
    model, tokenizer = load_lm(path, dev)
    chat_template(tokenizer)  # none: the error before the first question, not after it
    generator = torch.Generator(device=dev).manual_seed(seed)
    messages = [{"role": "system", "content": system}] if system else []
    while (turn := read_turn()) is not None:
        if not turn.strip():
            continue
        messages.append({"role": "user", "content": turn})
        ids = chat_ids(tokenizer, messages)
        reply = stream_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, generator, on_text)
        on_text("\n")
        messages.append({"role": "assistant", "content": reply})
    return messages


def _read_turn() -> str | None:
    try:
        return input("> ")
    except EOFError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m abi_train.generate",
        description="Continue a prompt, or answer it in chat form, with an LLM.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path", help="a run dir or checkpoints/step_* folder, a Hugging Face model folder or a .gguf file"
    )
    parser.add_argument(
        "--prompt",
        default="",
        help="text to continue or answer (default: start a new document; with --chat: a "
        "conversation typed on the terminal, each answer streamed, until Ctrl-D)",
    )
    parser.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a = parser.parse_args()

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if a.chat and not a.prompt:  # a conversation on the terminal, until Ctrl-D
        print("chat with the model; Ctrl-D ends it", file=sys.stderr)
        run_cli(
            lambda: chat_session(
                a.path, _read_turn, emit, a.max_new_tokens, a.temperature, a.top_k, a.seed, a.device, a.system
            )
        )
        return
    run_cli(
        lambda: generate_text(
            a.path, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.seed, a.device, a.chat, a.system, emit
        )
    )
    print()


if __name__ == "__main__":
    main()
