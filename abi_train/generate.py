"""python -m abi_train.generate <checkpoint or run dir> --prompt "..." [--max-new-tokens 64 --temperature 0.8
--top-k 50 --seed 0 --device auto]: print the prompt and a sampled continuation from an LLM checkpoint."""

from __future__ import annotations

import argparse

import torch

from abi_train.checkpoint import load_meta, load_model, resolve_checkpoint
from abi_train.cli import run_cli
from abi_train.data.tokenizer import Tokenizer
from abi_train.errors import UserError
from abi_train.utils import pick_device


def generate_text(
    path: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: str = "auto",
) -> str:
    """The prompt followed by its continuation (cut at the first end-of-text token)."""
    ckpt = resolve_checkpoint(path)
    family = load_meta(ckpt).get("family")
    if family != "llm":
        raise UserError(f"{ckpt} is not an LLM checkpoint (family {family!r})")
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k <= 0):
        raise UserError("--temperature and --max-new-tokens must be >= 0, --top-k > 0")
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    dev = pick_device(device)
    model, _ = load_model(ckpt, device=dev)
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]  # an empty prompt starts a new document
    generator = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=dev), max_new_tokens, temperature, top_k, generator)
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(new)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m abi_train.generate", description="Continue a prompt with an LLM checkpoint."
    )
    parser.add_argument("checkpoint", help="a run dir (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a = parser.parse_args()
    text = run_cli(
        lambda: generate_text(a.checkpoint, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.seed, a.device)
    )
    print(text)


if __name__ == "__main__":
    main()
