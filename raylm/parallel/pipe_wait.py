"""Seconds a pipeline stage spends waiting on its neighbours (the bubble it sees), timed per optimizer step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from deepspeed.runtime.pipe import schedule

# The instructions in which a stage computes nothing: point-to-point transfers, which block until the other
# stage arrives, and the all-reduce of tied weights between the first and last stage at the end of a step.
WAIT_INSTRUCTIONS = (
    schedule.SendActivation,
    schedule.RecvActivation,
    schedule.SendGrad,
    schedule.RecvGrad,
    schedule.ReduceTiedGrads,
)


class PipeWaitClock:
    """Times a DeepSpeed PipelineEngine's wait instructions. It installs timed copies of those entries in the
    engine's own instruction map (the class's map, which every engine shares, is left alone).

    On CPU (gloo) a transfer blocks the host until the other stage arrives, so wall time around it is the wait.
    On a GPU, NCCL queues the transfer and returns at once: the clock records a pair of CUDA events on the
    current stream around each instruction instead and reads them once, when the step's waits are taken. The
    stream reaches the second event only after the transfer it waits on is done, so the pair measures the device
    time the stage spent on it, and no device-wide synchronize is ever added to the step."""

    def __init__(self, pipeline_engine) -> None:
        self.wait_s = 0.0
        self.event_pairs: list[tuple] = []
        self.on_gpu = torch.cuda.is_available()
        timed = dict(type(pipeline_engine)._INSTRUCTION_MAP)
        for instruction in WAIT_INSTRUCTIONS:
            timed[instruction] = self._timed(timed[instruction])
        pipeline_engine._INSTRUCTION_MAP = timed

    def _timed(self, execute: Callable) -> Callable:
        def timed_execute(engine, **kwargs):
            if self.on_gpu:
                return self._timed_on_device(execute, engine, kwargs)
            start = time.perf_counter()
            try:
                return execute(engine, **kwargs)
            finally:
                self.wait_s += time.perf_counter() - start

        return timed_execute

    def _timed_on_device(self, execute: Callable, engine, kwargs: dict):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return execute(engine, **kwargs)
        finally:
            end.record()
            self.event_pairs.append((start, end))

    def take_wait_s(self) -> float:
        """Seconds waited since the last call (on a GPU, waits only for this step's last event)."""
        if self.event_pairs:
            self.event_pairs[-1][1].synchronize()  # events complete in stream order: the last one suffices
            self.wait_s += sum(start.elapsed_time(end) for start, end in self.event_pairs) / 1e3
            self.event_pairs.clear()
        waited, self.wait_s = self.wait_s, 0.0
        return waited
