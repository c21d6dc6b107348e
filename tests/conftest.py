"""Shared test helpers: run the CLI in a subprocess, compose configs in-process, tiny overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from abi_train.cli import config_dir

# A tiny, fast LLM run: the LLaMA-style debug model on short windows of the built-in corpus.
TINY_LLM = [
    "recipe=llm",
    "model=tiny",
    "data.seq_len=32",
    "data.vocab_size=512",
    "trainer.batch_size=4",
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenized-corpus cache for the whole session (tokenizing pydoc_data once is enough)."""
    return tmp_path_factory.mktemp("abi_cache")


def run_abi(
    args: list[str], module: str = "abi_train", cwd: Path | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` in a subprocess (never raises on a non-zero exit)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The config `python -m abi_train <overrides>` would run with (hydra.* keys left out)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


# Texts that stress a tokenizer: contractions, digit runs, whitespace runs, CRLF, non-ASCII, special tokens.
TRICKY_TEXTS = [
    "Hello world",
    "The quick brown fox's 123 jumps  over\n\tthe lazy dog.",
    "x = [1, 2, 3]  # a list\r\n    return x ** 2\n\n\n",
    "naïve café, Ünïcödé → 中文字符 and emoji 🎉🚀!",
    "   leading spaces, trailing spaces   ",
    "I'M SURE THEY'LL've DONE it; 3.14159 o'clock 1234567 2024-01-31",
    "tabs\t\t\tand\u00a0nbsp\n \n  \n",
    "one<|endoftext|>two",
]


def llamacpp_logits(path: Path, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` for the GGUF file ``path`` (llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def assert_export_cli_refuses(monkeypatch, capsys, cases: list[tuple[list[str], str]], out_dir: Path) -> None:
    """Each ``(argv, message)``: `python -m abi_train.export argv` exits 2 with one line holding ``message``
    and writes nothing into ``out_dir``."""
    from abi_train.export import __main__ as export_main

    for argv, msg in cases:
        monkeypatch.setattr(sys, "argv", ["x", *argv])
        with pytest.raises(SystemExit) as e:
            export_main.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert list(out_dir.iterdir()) == []
