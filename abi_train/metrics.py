"""Where numbers go: TensorBoard, metrics.jsonl, the progress bar, and throughput/MFU arithmetic.

Only rank 0 constructs an enabled MetricsLogger; other ranks get a disabled one that drops everything.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per card, from the vendors' data sheets. MFU is
# always reported against this bf16 peak, as nanoGPT and torchtitan do, whatever the run's precision.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (V100 has no bf16)
}


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of this device, or None when unknown (CPU, MPS, unlisted cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # ordered: specific names before generic ones
        if key in name:
            return flops
    return None


class MetricsLogger:
    """TensorBoard scalars/text/images plus one JSON object per logged step in metrics.jsonl."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True, jsonl: bool = True) -> None:
        self.enabled = run_dir is not None
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if jsonl:
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled or not values:
            return
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class Progress:
    """A rich progress bar (step, loss, throughput, ETA) on a terminal; one plain line per log elsewhere."""

    def __init__(self, total: int, start: int, unit: str, enabled: bool, mode: str | bool = "auto") -> None:
        on_terminal = sys.stderr.isatty()
        self.bar_enabled = enabled and (on_terminal if mode == "auto" else bool(mode))
        self.lines_enabled = enabled and not self.bar_enabled
        self.unit = unit
        self.total = total
        self._bar = None
        if self.bar_enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()
        self._t0 = time.perf_counter()

    def update(self, step: int, loss: float | None = None, rate: float | None = None) -> None:
        info = ""
        if loss is not None:
            info = f"loss {loss:.4f}" + (f"  {rate:,.0f} {self.unit}/s" if rate else "")
        if self._bar is not None:
            kwargs = {"info": info} if info else {}
            self._bar.update(self._task, completed=step, **kwargs)
        elif self.lines_enabled and info:
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.lines_enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
