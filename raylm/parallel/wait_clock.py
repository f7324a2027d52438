"""Seconds a rank spends in calls that block on its peers, timed around those calls: host time on CPU, a pair of
CUDA events on a GPU (read once, when the waits are taken)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class WaitClock:
    """`timed(call)` returns `call` wrapped so that its duration adds to the clock; `take_wait_s()` returns the
    seconds added since the last take.

    On CPU (gloo) a transfer or collective blocks the host until the peers arrive, so wall time around it is the
    wait. On a GPU, NCCL queues the work and returns at once: the clock records a pair of CUDA events on the
    current stream around each call instead. The stream reaches the second event only after the transfer it waits
    on is done, so the pair measures the device time spent on it, and no device-wide synchronize is ever added."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.event_pairs: list[tuple] = []
        self.on_gpu = torch.cuda.is_available()

    def timed(self, call: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            if self.on_gpu:
                return self._timed_on_device(call, args, kwargs)
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.wait_s += time.perf_counter() - start

        return timed_call

    def _timed_on_device(self, call: Callable, args: tuple, kwargs: dict):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return call(*args, **kwargs)
        finally:
            end.record()
            self.event_pairs.append((start, end))

    def take_wait_s(self) -> float:
        """Seconds waited since the last call (on a GPU, waits only for the last event recorded)."""
        if self.event_pairs:
            self.event_pairs[-1][1].synchronize()  # events complete in stream order: the last one suffices
            self.wait_s += sum(start.elapsed_time(end) for start, end in self.event_pairs) / 1e3
            self.event_pairs.clear()
        waited, self.wait_s = self.wait_s, 0.0
        return waited
