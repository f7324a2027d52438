"""Seconds a pipeline stage spends waiting on its neighbours (the bubble it sees), timed per optimizer step."""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule

from raylm.parallel.wait_clock import WaitClock

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
    """Times a DeepSpeed PipelineEngine's wait instructions (raylm.parallel.wait_clock). It installs timed copies of
    those entries in the engine's own instruction map (the class's map, which every engine shares, is left alone).
    """

    def __init__(self, pipeline_engine) -> None:
        self.clock = WaitClock()
        timed = dict(type(pipeline_engine)._INSTRUCTION_MAP)
        for instruction in WAIT_INSTRUCTIONS:
            timed[instruction] = self.clock.timed(timed[instruction])
        pipeline_engine._INSTRUCTION_MAP = timed

    def take_wait_s(self) -> float:
        """Seconds waited since the last call."""
        return self.clock.take_wait_s()
