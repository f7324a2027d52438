"""Where a run's start-up goes: the wall-clock marks the driver and rank 0 reach on the way to the first batch.

The driver (`raylm train`, or the Tune actor of a sweep trial) marks its phases and hands them to the workers in
the loop config; rank 0 adds its own and, once the first step's batch is in hand, appends them to
<run>/startup.jsonl (one row per start of the worker group: a restart or an ASHA promotion adds one) and logs the
phases in seconds. The marks are `time.time()` readings of different processes: the phases between a driver's
and a worker's mark hold only when both run on one machine (a local run; on a cluster they include the clocks'
offset)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.log import get_logger

if TYPE_CHECKING:
    from raylm.train.run_records import RunFiles

STARTUP_FILE = "startup.jsonl"
# The marks in the order a run reaches them; each phase runs from the latest mark before it that is set.
MARKS = (
    "launched",  # the driver's process started (Linux: /proc), or a reused Tune actor's next trial began
    "train_called",
    "ray_ready",
    "fit_called",
    "worker_entered",
    "imports_done",
    "engine_built",
    "first_batch",
)
PHASES = {  # phase name (seconds) -> the mark that ends it
    "driver_s": "train_called",
    "ray_start_s": "ray_ready",
    "run_setup_s": "fit_called",
    "worker_start_s": "worker_entered",
    "imports_s": "imports_done",
    "engine_s": "engine_built",
    "first_batch_s": "first_batch",
}


class StartupMarks:
    """The marks so far (name -> epoch seconds), carried from the driver to rank 0 as a plain dict."""

    def __init__(self, marks: dict[str, float] | None = None):
        self.marks: dict[str, float] = dict(marks or {})

    @classmethod
    def from_process_start(cls) -> StartupMarks:
        """Marks that begin when this process started (a `raylm` command's own process)."""
        marks = cls()
        started = process_started_at()
        if started is not None:
            marks.mark("launched", started)
        return marks

    def mark(self, name: str, at: float | None = None) -> None:
        """Record `name` now (or at `at`); a mark already set keeps its first reading."""
        self.marks.setdefault(name, time.time() if at is None else at)

    def phases(self) -> dict[str, float]:
        """Seconds of each phase whose two marks are both set (PHASES), in order."""
        return phases_of(self.marks)

    def first_step_done(self, row: dict, files: RunFiles) -> None:
        """Rank 0's first step of its worker group: mark when its batch was in hand (the step's start plus its
        data wait), write startup.json and copy it to the run's storage (`files`: the run's RunFiles)."""
        step_started = row["time"] - row["step_s"]
        self.mark("first_batch", step_started + row["step_s"] * row["data_wait_frac"])
        self.write(files.local)
        files.push((STARTUP_FILE,))

    def write(self, run_dir: Path) -> Path:
        """A row of startup.jsonl in the run's local folder, and one line with the phases on rank 0's console."""
        path = Path(run_dir) / STARTUP_FILE
        with path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"marks": self.marks, "phases": self.phases()}) + "\n")
        first = next((self.marks[m] for m in MARKS if m in self.marks), None)
        last = self.marks.get("first_batch")
        total = f"{last - first:.1f} s" if first is not None and last is not None else "start-up"
        get_logger().info(
            "%s from the start to the first batch: %s",
            total,
            ", ".join(
                f"{name[:-2].replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.phases().items()
            ),
        )
        return path


def phases_of(marks: dict[str, float]) -> dict[str, float]:
    """PHASES from a row's marks: a phase runs from the latest earlier mark that is set to its own."""
    out: dict[str, float] = {}
    for name, end in PHASES.items():
        earlier = [marks[m] for m in MARKS[: MARKS.index(end)] if m in marks]
        if end in marks and earlier:
            out[name] = round(marks[end] - earlier[-1], 3)
    return out


def read_startups(run_dir: Path) -> list[dict]:
    """A run's startup.jsonl rows (marks and phases), one per start of its worker group, oldest first."""
    path = Path(run_dir) / STARTUP_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def process_started_at() -> float | None:
    """When this process started, in epoch seconds (Linux's /proc, to 10 ms; None elsewhere)."""
    try:
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started_after_boot_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
    return time.time() - (uptime_s - started_after_boot_s)
