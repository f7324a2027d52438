"""Seconds a pipeline stage spends waiting on its neighbours (the bubble it sees), timed per optimizer step."""

from __future__ import annotations

import time
from typing import Callable

import torch
from deepspeed.runtime.pipe import schedule

# The instructions in which a stage computes nothing: point-to-point transfers, which block until the other
# stage arrives, and the all-reduce of tied weights between the first and last stage at the end of a step.
WAIT_INSTRUCTIONS = (schedule.SendActivation, schedule.RecvActivation, schedule.SendGrad, schedule.RecvGrad,
                     schedule.ReduceTiedGrads)


class PipeWaitClock:
    """Times a DeepSpeed PipelineEngine's wait instructions. It installs timed copies of those entries in the
    engine's own instruction map (the class's map, which every engine shares, is left alone).

    On a GPU, NCCL queues transfers on the device and returns at once, so the clock synchronizes the device
    around each timed instruction: the queued compute before it counts as compute, the transfer as waiting."""

    def __init__(self, pipeline_engine):
        self.wait_s = 0.0
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        timed = dict(type(pipeline_engine)._INSTRUCTION_MAP)
        for instruction in WAIT_INSTRUCTIONS:
            timed[instruction] = self._timed(timed[instruction])
        pipeline_engine._INSTRUCTION_MAP = timed

    def _timed(self, execute: Callable) -> Callable:
        def timed_execute(engine, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return execute(engine, **kwargs)
            finally:
                self.sync()
                self.wait_s += time.perf_counter() - start

        return timed_execute

    def take_wait_s(self) -> float:
        """Seconds waited since the last call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited
