"""python -m abi_train.export <run dir or checkpoint> -o model.gguf [--outtype f16]"""

from __future__ import annotations

import argparse
import logging

from abi_train.cli import run_cli
from abi_train.export import export_checkpoint
from abi_train.export.gguf_common import OUTTYPES


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m abi_train.export", description="Export a checkpoint to GGUF.")
    parser.add_argument("checkpoint", help="a run dir (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("-o", "--output", required=True, help="the .gguf file to write (its directory must exist)")
    parser.add_argument("--outtype", default="f16", help=f"{' | '.join(OUTTYPES)} (default f16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = run_cli(lambda: export_checkpoint(args.checkpoint, args.output, args.outtype))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
