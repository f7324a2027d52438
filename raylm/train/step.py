"""One optimizer step and one evaluation on a parallel engine, timed, with the time spent waiting for data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raylm.data.stream import RankStream


@dataclass(frozen=True)
class TrainState:
    """Where a run is: optimizer steps done, tokens trained and global samples consumed (the stream offset)."""

    step: int = 0
    tokens: int = 0
    samples: int = 0

    def advance(self, global_batch: int, seq_len: int) -> TrainState:
        return replace(
            self,
            step=self.step + 1,
            tokens=self.tokens + global_batch * seq_len,
            samples=self.samples + global_batch,
        )

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens, "samples": self.samples}

    @classmethod
    def from_state_dict(cls, saved: dict) -> TrainState:
        return cls(step=saved["step"], tokens=saved["tokens"], samples=saved["samples"])


@dataclass(frozen=True)
class StepResult:
    loss: float
    step_s: float
    data_wait_s: float
    pipe_wait_s: float = 0.0


class TimedIterator:
    """Wraps a rank's stream and adds up the seconds spent inside next(): the data-wait share of a step."""

    def __init__(self, batches: RankStream):
        self.batches = batches
        self.wait_s = 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.wait_s += time.perf_counter() - start

    def set_window(self, seq_len: int) -> None:
        """The stream's window length from the next micro-batch on (schedule.seq_len)."""
        self.batches.set_window(seq_len)

    def take_wait_s(self) -> float:
        waited, self.wait_s = self.wait_s, 0.0
        return waited


def train_step(
    engine, batches: TimedIterator | None, micro_batches: int, lr: float, seq_len: int
) -> StepResult:
    """Set the step's learning rate, micro-batch count and window length, run engine.train_batch, and time it."""
    engine.set_lr(lr)
    engine.set_micro_batches(micro_batches)
    engine.set_seq_len(seq_len)
    if batches is not None:
        batches.set_window(seq_len)
    engine.take_pipe_wait_s()  # drop waits from anything run since the last step (an evaluation)
    start = time.perf_counter()
    loss = engine.train_batch(batches)
    step_s = time.perf_counter() - start
    return StepResult(
        loss=float(loss),
        step_s=step_s,
        data_wait_s=batches.take_wait_s() if batches else 0.0,
        pipe_wait_s=engine.take_pipe_wait_s(),
    )


def evaluate(engine, batches: Iterator | None, micro_batches: int, seq_len: int) -> float:
    """Mean validation loss over `micro_batches` micro-batches per DP rank of whole `seq_len` windows (no
    optimizer step, no stream moved)."""
    engine.set_seq_len(seq_len)
    return float(engine.eval_batch(batches, micro_batches))
