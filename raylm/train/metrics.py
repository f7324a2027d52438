"""Step metrics: FLOP peaks and MFU, the metrics.jsonl + TensorBoard writer (rank 0), and the loss-curve PNG."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peaks per GPU in FLOP/s (not the 2x sparsity figures).
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5,
                        windows: int = 5) -> float:
    """FLOP/s of a square matmul on this process's CPU threads: the CPU 'peak' that MFU is measured against.

    The best of `windows` equal slices of `seconds`: a peak, so a slice slowed by another process's burst
    (Ray starting its workers, say) does not lower it and flatter the MFU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm up kernels and caches
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            torch.matmul(a, b)
            runs += 1
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def gpu_peak_flops() -> float | None:
    """The dense bf16 peak of this process's GPU by name, or None when unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in DENSE_BF16_PEAK.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (PaLM appendix B): achieved model FLOP/s over the hardware's peak."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    A run resumed at `start_step` first drops the rows an interrupted attempt logged from that step on, so the
    file holds each step once, in order."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        if start_step:
            _drop_rows_from(self.path, start_step)
        self.file = self.path.open("a")
        self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                         purge_step=start_step or None)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()


def _drop_rows_from(path: Path, start_step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the rows of steps >= start_step."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path) -> Path | None:
    """Write <run>/loss.png from metrics.jsonl (train loss per step, validation loss on eval steps)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    evals = [r for r in rows if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
