"""Rank 0's view of a run: metrics.jsonl rows (and run.trackers) and a live progress line (step, loss, tok/s, ETA)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from raylm.config import Config, to_dict
from raylm.log import get_logger
from raylm.train.metrics import MetricsWriter

PROGRESS_EVERY_S = 5.0


class Progress:
    """Writes every `train.log_every`-th row and prints a progress line at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0):
        self.cfg = cfg
        self.writer = MetricsWriter(run_dir, start_step, to_dict(cfg))
        self.start_step = start_step
        self.started = time.perf_counter()
        self.last_print = 0.0

    def record(self, row: dict[str, Any], force: bool = False) -> None:
        if force or row["step"] % self.cfg.train.log_every == 0:
            self.writer.write(row)
        now = time.perf_counter()
        if force or now - self.last_print >= PROGRESS_EVERY_S or row["step"] == self.start_step:
            self.last_print = now
            get_logger().info(self.line(row, now - self.started))

    def line(self, row: dict[str, Any], elapsed_s: float) -> str:
        done = row["step"] + 1
        eta_s = elapsed_s / max(1, done - self.start_step) * (self.cfg.train.max_steps - done)
        loss = "n/a" if row["loss"] is None else f"{row['loss']:.4f}"  # a skipped non-finite step has none
        text = (
            f"step {done}/{self.cfg.train.max_steps} | loss {loss} | lr {row['lr']:.2e} | "
            f"batch {row['batch_size']} | {row['tokens_per_s'] / 1e3:.1f}k tok/s | mfu {_percent(row['mfu'])} | "
            f"data wait {row['data_wait_frac']:.1%} | "
        )
        if self.cfg.parallel.pp > 1:
            text += f"pipe wait {row['pipe_wait_frac']:.1%} | "
        text += f"eta {_clock(eta_s)}"
        if "val_loss" in row:
            text += f" | val_loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})"
        return text

    def close(self) -> None:
        self.writer.close()


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
