"""``python scripts/bench.py ARGS`` is ``python -m abi_train.bench ARGS``: the benchmark of a recipe's training step
(see abi_train/bench.py for its options)."""

from abi_train.bench import main

if __name__ == "__main__":
    main()
