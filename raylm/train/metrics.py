"""Step metrics: the metrics.jsonl writer that also feeds run.trackers (rank 0), and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.storage.atomic import write_atomic
from raylm.storage.file_names import LOSS_PLOT_FILE, METRICS_FILE
from raylm.train.tracking.trackers import open_trackers

TENSORBOARD_ONLY = {"run": {"trackers": ["tensorboard"]}}


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and hands the row to the run's trackers
    (`config`: the resolved config as a mapping; run.trackers names them).

    A worker group (re)started at `start_step` first drops the rows an interrupted attempt logged from that step
    on (all of them when it starts again from step 0, before any checkpoint), so the file holds each step once,
    in order, however often the group restarts; each tracker does the same its own way."""

    def __init__(self, run_dir: Path, start_step: int = 0, config: dict[str, Any] = TENSORBOARD_ONLY):
        self.path = Path(run_dir) / METRICS_FILE
        rerun = _drop_rows_from(self.path, start_step)
        self.file = self.path.open("a")
        self.trackers = open_trackers(config, Path(run_dir), start_step, rerun)
        kept = read_metrics(run_dir) if rerun else []
        for tracker in self.trackers:
            tracker.catch_up(kept)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log_rows([row])

    def close(self, finished: bool = True) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close(finished)


def _drop_rows_from(path: Path, start_step: int) -> bool:
    """Rewrite metrics.jsonl (atomically) without the rows of steps >= start_step; whether the file existed.

    A line that is not JSON can only be the last one, torn by a SIGKILL in mid-write: it is dropped too."""
    if not path.exists():
        return False
    steps = [(line, _step_of(line)) for line in path.read_text().splitlines()]
    kept = [line for line, step in steps if step is not None and step < start_step]
    write_atomic(path, "".join(line + "\n" for line in kept))
    return True


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(run_dir: Path, title: str | None = None) -> Path | None:
    """Write <run>/loss.png from metrics.jsonl (train loss per step, validation loss on eval steps); the title is
    the run's name (the folder's, unless given)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    losses = [float("nan") if r["loss"] is None else r["loss"] for r in rows]  # a skipped step's loss is null
    ax.plot([r["step"] for r in rows], losses, label="train loss", linewidth=1)
    evals = [r for r in rows if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / LOSS_PLOT_FILE
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
