"""python -m abi_train.export <run dir or checkpoint> -o model.gguf [--outtype f16] | -o DIR --format hf"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from abi_train.cli import run_cli
from abi_train.errors import UserError
from abi_train.export.gguf_common import OUTTYPES

EXAMPLES = """examples:
  python -m abi_train.export runs/llm/my_run -o model.gguf --outtype q8_0
  python -m abi_train.export runs/llm/my_run -o my_model_hf --format hf --max-shard-size 2GB"""


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m abi_train.export",
        description="Export a checkpoint to GGUF (llama.cpp) or to a Hugging Face model folder (transformers).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run dir (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="gguf: the .gguf file to write (its directory must exist); hf: the folder to create (new or empty)",
    )
    parser.add_argument("--format", choices=("gguf", "hf"), default="gguf", help="gguf (default) | hf")
    parser.add_argument("--outtype", default=None, help=f"gguf only: {' | '.join(OUTTYPES)} (default f16)")
    parser.add_argument(
        "--max-shard-size", default=None, help="hf only: split the safetensors past this size (default 5GB)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = run_cli(lambda: export(args))
    print(f"wrote {out}")


def export(args: argparse.Namespace) -> Path:
    """The chosen format's export; an option of the other format is a one-line UserError."""
    if args.format == "hf":
        if args.outtype is not None:
            raise UserError("--outtype is for --format gguf; --format hf writes float32 safetensors")
        from abi_train.hf import DEFAULT_MAX_SHARD_BYTES, export_hf, parse_size

        size = parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_BYTES
        return export_hf(args.checkpoint, args.output, size)
    if args.max_shard_size is not None:
        raise UserError("--max-shard-size is for --format hf; a GGUF file is written whole")
    from abi_train.export import export_checkpoint

    return export_checkpoint(args.checkpoint, args.output, args.outtype or "f16")


if __name__ == "__main__":
    main()
