"""The command line end to end, in subprocesses: the main job, overrides, bad input, multirun, the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_LLM, losses, run_abi

REPO = Path(__file__).resolve().parents[1]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error = lines[-1]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert error.startswith("error:") or "Could not" in proc.stderr or "Available options" in proc.stderr, error


def test_train_run_dir_layout_and_generate(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = run_abi(
        [
            *TINY_LLM,
            f"data.cache_dir={cache_dir}",
            "trainer.eval_every=2",
            "trainer.ckpt_every=2",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert {"config.yaml", "checkpoints", "tensorboard", "metrics.jsonl", "tokenizer.json"} <= {
        p.name for p in run.iterdir()
    }
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(losses(run)) == [1, 2, 3, 4]
    rows = (run / "metrics.jsonl").read_text()
    assert '"val/loss"' in rows and '"val/ppl"' in rows and '"lr"' in rows
    gen = run_abi(
        [str(run), "--prompt", "The function", "--max-new-tokens", "8", "--seed", "1"], module="abi_train.generate"
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The function") and len(gen.stdout) > len("The function")


def test_cfg_job_prints_resolved_config(tmp_path):
    proc = run_abi(["recipe=llm", "model=gpt2-tiny", "optim.lr=0.01", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "task: llm" in proc.stdout and "style: gpt2" in proc.stdout and "lr: 0.01" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_multirun_sweep(tmp_path, cache_dir):
    proc = run_abi(
        [
            "-m",
            *TINY_LLM,
            f"data.cache_dir={cache_dir}",
            "trainer.max_steps=2",
            "trainer.seed=1,2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    assert losses(runs[0]) != losses(runs[1])


def test_help_is_the_tools_own_page(tmp_path):
    """--help: what abi_train is, the recipes with their results, the groups, the common keys with this
    command's values, examples and where the full config is; Hydra's page stays behind --hydra-help."""
    proc = run_abi(["recipe=vit", "trainer.precision=bf16", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    assert page.startswith("abi_train: one PyTorch trainer") and "powered by Hydra" not in page
    for recipe, result in (
        ("llm", "val loss 5.6 -> 3.6"),
        ("vit", "95.2% val top-1"),
        ("clip", "zero-shot top-1 0.73"),
        ("sft", "persona rate 0 -> 1.0"),
    ):
        assert any(line.split()[:1] == [recipe] and result in line for line in page.splitlines()), recipe
    assert (
        "recipe: clip, llm, sft, vit" in page
        and "adapter: lora, none" in page
        and "model: clip-b16, clip-b32, clip-tiny" in page
    )
    # The values are those of this command: the vit recipe's steps and batch, the override, no LLM-only keys.
    assert "trainer.max_steps=1500" in page and "trainer.batch_size=128" in page
    assert "trainer.precision=bf16" in page and "trainer.global_batch_size=null" in page
    assert "data.name=shapes" in page and "data.seq_len" not in page
    examples = page[page.index("== Examples ==") :]
    assert all(word in examples for word in ("-m recipe=", "resume=auto", "abi_train.export", "torchrun"))
    assert "--cfg job" in page and "--hydra-help" in page
    assert not (tmp_path / "runs").exists()
    hydra_page = run_abi(["--hydra-help"], cwd=tmp_path)
    assert hydra_page.returncode == 0 and "Hydra (" in hydra_page.stdout and "--cfg" in hydra_page.stdout


def test_bench_help_ends_with_an_example(tmp_path):
    proc = run_abi(["--help"], module="abi_train.bench", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("usage: python -m abi_train.bench") and "bench.steps=30" in proc.stdout
    assert lines[-3].startswith("Example") and lines[-2].strip().startswith("python -m abi_train.bench recipe=")
    assert not list(tmp_path.iterdir())


BAD_INPUTS = [
    (["recipe=nope"], ["recipe/nope", "llm"]),
    (["model=nope"], ["model/nope", "tiny"]),
    (["optim.name=sgd"], ["optim.name='sgd'", "adamw"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0"]),
    (["trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16"]),
    (["data.seq_len=4096"], ["seq_len", "4096"]),
    (["data.files=/does/not/exist.txt"], ["/does/not/exist.txt"]),
    (["resume=true"], ["resume=true", "no checkpoint"]),
    (["resume=maybe"], ["resume='maybe' is not known", "auto"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD_INPUTS, ids=[o[0] for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, cache_dir, overrides, fragments):
    run = tmp_path / "run"
    proc = run_abi([*TINY_LLM, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run}", *overrides], cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not run.exists() or not any(run.iterdir())  # nothing half-written


def test_missing_text_field_and_empty_file(tmp_path, cache_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello world"}\n')
    proc = run_abi([*TINY_LLM, f"data.files={data}", f"hydra.run.dir={tmp_path / 'r1'}"], cwd=tmp_path)
    assert_one_line_error(proc, "text", "body")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_abi([*TINY_LLM, f"data.files={empty}", f"hydra.run.dir={tmp_path / 'r2'}"], cwd=tmp_path)
    assert_one_line_error(proc, "empty.txt")


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path):
    """A plain (non-editable) install finds its configs and recipes from any working directory."""
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(tmp_path / "dist"), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("abi_train-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "abi_train/configs/train.yaml" in names and "abi_train/configs/recipe/llm.yaml" in names
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_abi(["recipe=llm", "--cfg", "job"], cwd=elsewhere, env={"PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert "task: llm" in proc.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import abi_train.cli as c; print(c.config_dir())"],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README's quick start gives (install + pytest)."""
    readme = (REPO / "README.md").read_text().splitlines()
    marker = readme.index("<!-- ci:test -->")
    command = readme[marker + 2]
    assert "pytest" in command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[ci.index("# README test command:") + 1] == command
