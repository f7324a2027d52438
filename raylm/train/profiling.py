"""train.profile_steps: torch.profiler around steps START..END on every rank, written to
<run>/profile/rank-NNNNN.json.gz (a Chrome trace: Perfetto or chrome://tracing open it) and the rank's top operators
to rank-NNNNN.top.txt. CPU activity always, CUDA's when a GPU is there, memory as the profiler records it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from raylm.log import get_logger
from raylm.train.run_records import RunFiles

PROFILE_FOLDER = "profile"
TOP_OPERATORS = 30  # rows of the top-operators table


class StepProfiler:
    """Starts the profiler before step START (or the first step a resumed run trains inside the range) and
    writes its files after step END; every other step runs untouched."""

    def __init__(self, profile_steps: list[int], files: RunFiles, rank: int):
        self.first, self.last = profile_steps if profile_steps else (-1, -2)
        self.files, self.rank = files, rank
        self.profiler: Any = None

    def around(self, step: int):
        """A context for training `step`: profiled when it lies in the range."""
        if not self.first <= step <= self.last:
            return nullcontext()
        return self._profiled(step)

    @contextmanager
    def _profiled(self, step: int) -> Iterator[None]:
        if self.profiler is None:
            self.profiler = _start()
        with torch.profiler.record_function(f"raylm step {step}"):
            yield
        if step == self.last:
            self._write()

    def _write(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        folder = self.files.local / PROFILE_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        trace, top = folder / f"rank-{self.rank:05d}.json.gz", folder / f"rank-{self.rank:05d}.top.txt"
        profiler.export_chrome_trace(str(trace))  # gzipped by torch for a .gz name
        top.write_text(top_operators(profiler) + "\n")
        self.files.push(tuple(f"{PROFILE_FOLDER}/{path.name}" for path in (trace, top)))
        if self.rank == 0:
            get_logger().info(
                "profile of steps %d..%d written to %s (rank-NNNNN.json.gz: open in Perfetto)",
                self.first,
                self.last,
                self.files.run / PROFILE_FOLDER,
            )


def _start():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
    profiler.start()
    return profiler


def top_operators(profiler) -> str:
    """The operators that took the most time of their own (on the GPU when there is one), as torch tabulates them."""
    sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)
