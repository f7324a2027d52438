"""Fault drills (fault.drill), once per run, to rehearse recovery for real: SIGKILL one worker at a named point,
make one micro-batch's loss NaN on one rank, or multiply one step's learning rate by 1000."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from raylm.config import Config
from raylm.errors import ConfigError
from raylm.log import get_logger

FIRED_MARKER = ".fault-drill-fired"  # in the run folder: a restarted worker group does not fire the drill again
SPIKE_LR_FACTOR = 1000.0


class FaultDrill:
    """`at(phase, step)` kills this process when the drill names this rank, phase and step, the first time only;
    `poison(engine, step)` and `lr_factor(step)` fire the non-finite and spike drills (STEP = the 0-based step)."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int):
        phase, _, step = cfg.fault.drill.partition("@")
        self.rank = rank
        self.armed = bool(cfg.fault.drill) and rank == cfg.fault.drill_rank
        self.phase, self.step = phase, int(step or 0)
        self.marker = run_dir / FIRED_MARKER
        # the spike drill changes every rank's lr, so every rank decides now whether it already fired (a restart)
        self.spike_due = phase == "spike" and not self.marker.exists()

    def at(self, phase: str, step: int) -> None:
        if not self.armed or phase != self.phase or step != self.step or self.marker.exists():
            return
        self._fired(f"{phase}@{step}")
        get_logger().warning("fault drill: killing this worker (pid %d) at %s of step %d", os.getpid(), phase, step)
        os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, engine, step: int) -> None:
        """nonfinite@STEP: the drill rank's first micro-batch loss of step STEP becomes NaN."""
        if not self.armed or self.phase != "nonfinite" or step != self.step or self.marker.exists():
            return
        if not engine.computes_loss:
            raise ConfigError(f"fault.drill_rank={self.rank} is on pipeline stage {engine.coords.pp_stage}, which "
                              f"computes no loss; pick a rank of the last stage for fault.drill=nonfinite@{step}")
        self._fired(f"nonfinite@{step}")
        get_logger().warning("fault drill: rank %d makes a micro-batch loss of step %d NaN", self.rank, step)
        engine.poison_next_loss()

    def lr_factor(self, step: int) -> float:
        """spike@STEP: step STEP trains at 1000 x its lr on every rank."""
        if not self.spike_due or step != self.step:
            return 1.0
        self.spike_due = False
        if self.armed:
            self._fired(f"spike@{step}")
            get_logger().warning("fault drill: step %d trains at %g x its learning rate", step, SPIKE_LR_FACTOR)
        return SPIKE_LR_FACTOR

    def _fired(self, what: str) -> None:
        self.marker.write_text(what + "\n")
