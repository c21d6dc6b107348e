"""Pre-tokenize a large corpus into memory-mappable token shards (read with data=shards).

    python scripts/make_token_shards.py --input 'corpus/*.jsonl' --text-field text \
        --tokenizer runs/llm/X/tokenizer.json --out data/shards [--shard-tokens 100000000]
    python -m abi_train recipe=llm data=shards data.path=data/shards

Documents are streamed (never all in memory) and split exactly as data=text splits them: the last
--val-fraction of the characters is validation. See abi_train/data/tokens.py for the folder layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abi_train.data.text import (
    FileDocuments,
    default_cache_dir,
    encode_documents,
    resolve_files,
    split_documents,
)
from abi_train.data.tokenizer import Tokenizer
from abi_train.data.tokens import ShardWriter
from abi_train.errors import UserError


def make_shards(args: argparse.Namespace) -> dict:
    tokenizer = Tokenizer.load(args.tokenizer)
    writer = ShardWriter(args.out, tokenizer, args.shard_tokens)  # checks --out before the slow part
    try:
        docs = FileDocuments(resolve_files(args.input), args.text_field, args.cache_dir / "hf_datasets")
        total = sum(len(d) for d in docs)
        if total == 0:
            raise UserError(f"--input holds no text in field {args.text_field!r}")
        for split, want_val in (("train", False), ("val", True)):
            pieces = (t for t, is_val in split_documents(docs, total, args.val_fraction) if is_val == want_val)
            for tokens in encode_documents(tokenizer, pieces):
                writer.add(split, tokens)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or globs (.txt .json .jsonl .parquet .csv)")
    p.add_argument("--text-field", default="text", help="column holding the text (ignored for .txt)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (copied into --out)")
    p.add_argument("--out", required=True, help="new (or empty) output folder")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--val-fraction", type=float, default=0.005, help="last fraction of the text kept for validation")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="HF datasets cache root")
    args = p.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        p.error("--val-fraction must be between 0 and 1 (exclusive)")
    try:
        meta = make_shards(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {len(meta['shards']['train'])} train + {len(meta['shards']['val'])} val shards "
        f"({meta['train_tokens']:,} + {meta['val_tokens']:,} tokens, {meta['dtype']}) to {args.out}"
    )


if __name__ == "__main__":
    main()
