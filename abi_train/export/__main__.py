"""python -m abi_train.export <run dir or checkpoint> -o OUT [--format gguf | hf | gguf-lora | peft]

gguf and hf write the whole model (a LoRA run's adapter merged in); gguf-lora and peft write a LoRA run's
adapter alone, for llama.cpp (over the base's GGUF) or PEFT (over the base's HF folder)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from abi_train.cli import run_cli
from abi_train.errors import UserError
from abi_train.export.gguf_common import OUTTYPES

FORMATS = ("gguf", "hf", "gguf-lora", "peft")
EXAMPLES = """examples:
  python -m abi_train.export runs/llm/my_run -o model.gguf --outtype q8_0
  python -m abi_train.export runs/llm/my_run -o my_model_hf --format hf --max-shard-size 2GB
  python -m abi_train.export runs/llm/my_lora_run -o adapter.gguf --format gguf-lora
      (llama.cpp: llama-cli -m base.gguf --lora adapter.gguf)
  python -m abi_train.export runs/llm/my_lora_run -o my_adapter --format peft
      (transformers: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "my_adapter"))
A LoRA run (adapter=lora) exports with --format gguf / hf as the merged model."""


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m abi_train.export",
        description="Export a checkpoint to GGUF (llama.cpp) or to a Hugging Face model folder (transformers); "
        "a LoRA run's adapter alone to a llama.cpp LoRA GGUF or a PEFT adapter folder.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run dir (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="gguf, gguf-lora: the .gguf file to write (its directory must exist); hf, peft: the folder to create "
        "(new or empty)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="gguf",
        help="gguf (default) | hf: the model; gguf-lora | peft: a LoRA run's adapter",
    )
    parser.add_argument(
        "--outtype", default=None, help=f"gguf: {' | '.join(OUTTYPES)} (default f16); gguf-lora: f32 (default) | f16"
    )
    parser.add_argument(
        "--max-shard-size", default=None, help="hf only: split the safetensors past this size (default 5GB)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = run_cli(lambda: export(args))
    print(f"wrote {out}")


def export(args: argparse.Namespace) -> Path:
    """The chosen format's export; an option of another format is a one-line UserError."""
    if args.max_shard_size is not None and args.format != "hf":
        raise UserError(f"--max-shard-size is for --format hf; --format {args.format} is written whole")
    if args.outtype is not None and args.format in ("hf", "peft"):
        raise UserError(
            f"--outtype is for --format gguf / gguf-lora; --format {args.format} writes float32 safetensors"
        )
    if args.format == "hf":
        from abi_train.export import export_hf
        from abi_train.hf import DEFAULT_MAX_SHARD_BYTES, parse_size

        size = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_BYTES
        return export_hf(args.checkpoint, args.output, size)
    if args.format == "peft":
        from abi_train.hf.peft import export_peft

        return export_peft(args.checkpoint, args.output)
    if args.format == "gguf-lora":
        from abi_train.export.gguf_lora import export_checkpoint_lora

        return export_checkpoint_lora(args.checkpoint, args.output, args.outtype or "f32")
    from abi_train.export import export_checkpoint

    return export_checkpoint(args.checkpoint, args.output, args.outtype or "f16")


if __name__ == "__main__":
    main()
