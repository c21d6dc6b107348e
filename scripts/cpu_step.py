"""abi_train's training step beside nanoGPT's at nanoGPT's own CPU shape, interleaved in one process.

    OMP_NUM_THREADS=2 python scripts/cpu_step.py [--steps 200] [--threads 2] [--unfused-adamw]

nanoGPT's README runs on a CPU with 4 layers, 4 heads, 128 wide, block 64, batch 12 (here a 2048-token
vocabulary), fp32, no torch.compile. Both steps run in the same process, one after the other, so they see the
same machine (separate processes differ by up to 30% from run to run on a shared 2-core machine):
  - abi_train: the real ``Trainer.train_step`` of ``recipe=llm`` with that shape (``model=gpt2-tiny``,
    bias-free like nanoGPT's train.py default, grad clip 1.0), built by the bench's setup, twice: with GPT-2's
    tanh GELU (the default, what llama.cpp computes) and with ``model.act=gelu``, nanoGPT's exact GELU (the
    same function as nanoGPT's model);
  - nanoGPT: its model.py (at .ref/nanogpt_model.py, see scripts/gpu_reference.py) and its train.py loop:
    forward, backward, clip_grad_norm_(1.0), AdamW as its configure_optimizers makes it, zero_grad.
``--unfused-adamw`` gives abi_train the optimizer it had before (PyTorch's CPU default AdamW, a loop over
tensors) to price that change. Prints one JSON line: the median step of each and the ratios (>1: abi_train is
faster).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=2048, batch=12)


def abi_step(act: str):
    from abi_train.bench import compose
    from abi_train.distributed import DistInfo
    from abi_train.tasks import task_class
    from abi_train.trainer import Trainer

    s = SHAPE
    cfg = compose(
        [
            "recipe=llm",
            "model=gpt2-tiny",
            f"model.n_layer={s['n_layer']}",
            f"model.n_head={s['n_head']}",
            f"model.d_model={s['d_model']}",
            f"model.context_length={s['context_length']}",
            f"model.vocab_size={s['vocab_size']}",
            "model.bias=false",
            f"model.act={act}",
            f"data.seq_len={s['context_length']}",
            f"trainer.batch_size={s['batch']}",
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "trainer.grad_clip=1.0",
            "optim.weight_decay=0.1",
        ]
    )
    task = task_class("llm")(cfg, DistInfo())
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, task, run_dir, DistInfo())
        trainer.setup()
    trainer.batches = itertools.repeat(task.synthetic_batch(s["batch"]))
    trainer.model.train()
    return lambda: trainer.train_step(trainer.batches).loss


def nanogpt_step():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".ref"))
    from nanogpt_model import GPT, GPTConfig

    s = SHAPE
    model = GPT(
        GPTConfig(
            block_size=s["context_length"],
            vocab_size=s["vocab_size"],
            n_layer=s["n_layer"],
            n_head=s["n_head"],
            n_embd=s["d_model"],
            dropout=0.0,
            bias=False,
        )
    )
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    tokens = torch.randint(
        0, s["vocab_size"], (s["batch"], s["context_length"] + 1), generator=torch.Generator().manual_seed(0)
    )
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps of each (after 20 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unfused-adamw", action="store_true", help="abi_train's AdamW as before: not fused")
    args = ap.parse_args()
    if args.unfused_adamw:
        import abi_train.trainer
        from abi_train.optim import param_groups

        abi_train.trainer.build_optimizer = lambda model, cfg: torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {"abi_train": abi_step("gelu_tanh"), "abi_train_exact_gelu": abi_step("gelu"), "nanogpt": nanogpt_step()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(20 + args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if i >= 20:
                times[name].append((time.perf_counter() - t) * 1e3)
    median = {name: statistics.median(t) for name, t in times.items()}
    record = {
        "shape": SHAPE,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "abi_train_adamw": "default (unfused)" if args.unfused_adamw else "fused",
        **{f"{name}_step_ms": round(ms, 2) for name, ms in median.items()},
        "speed_ratio": round(median["nanogpt"] / median["abi_train"], 3),
        "speed_ratio_exact_gelu": round(median["nanogpt"] / median["abi_train_exact_gelu"], 3),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
