"""python -m abi_train.models [list | info NAME | path NAME | download NAME]

The models this machine has (the Hugging Face cache and the packaged ones) and whether abi_train loads them;
the logic lives in abi_train/catalog.py and abi_train/hub.py."""

from __future__ import annotations

import argparse

from abi_train.cli import run_cli

EXAMPLES = """NAME is what init_from takes: a hub id (org/name, org/name@revision, org/name:QUANT for a GGUF repo's
file), a packaged model's name or a local path.
examples:
  python -m abi_train.models                                   # list
  python -m abi_train.models info Qwen/Qwen2.5-0.5B-Instruct
  python -m abi_train.models download Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0
  python -m abi_train recipe=llm init_from=$(python -m abi_train.models path Qwen/Qwen2.5-0.5B-Instruct) ...
The cache is huggingface_hub's (HF_HOME, HF_HUB_CACHE); HF_HUB_OFFLINE=1 keeps everything but download local."""


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m abi_train.models",
        description="The models on this machine: the Hugging Face cache and the packaged ones, with their "
        "architecture, parameters, size and whether abi_train loads them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{list,info,path,download}")
    commands.add_parser("list", help="a table of the models (the default)")
    for command, text in (
        ("info", "one model's facts, revision and files"),
        ("path", "its local path only (for scripts); never downloads"),
        ("download", "fetch it from the hub into the HF cache (config, tokenizer, safetensors; or one GGUF file)"),
    ):
        commands.add_parser(command, help=text).add_argument("name", help="a hub id, packaged name or path")
    args = parser.parse_args()
    run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from abi_train import catalog, hub

    if args.command == "info":
        catalog.print_info(args.name)
    elif args.command == "path":
        print(catalog.local_path(args.name))
    elif args.command == "download":
        print(hub.download(args.name))
    else:
        catalog.print_list()


if __name__ == "__main__":
    main()
