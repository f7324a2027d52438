"""TensorBoard: every numeric field of a row as a scalar at its step, in <run>/tensorboard (written in-line: a
local file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylm.train.tracking.base import Tracker, numbers

TENSORBOARD_FOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    """A worker group restarted at `start_step` purges the events an interrupted attempt wrote from that step on
    (`rerun`: metrics.jsonl already existed), as metrics.jsonl drops its rows."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int, rerun: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(Path(run_dir) / TENSORBOARD_FOLDER), purge_step=start_step if rerun else None
        )

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for key, value in numbers(row).items():
                self.writer.add_scalar(key, value, row["step"])

    def close(self, finished: bool) -> None:
        self.writer.close()
