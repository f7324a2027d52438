"""Fault drills (fault.drill), each once per run, to rehearse recovery for real: SIGKILL a worker at a named point,
make one micro-batch's loss NaN on one rank, multiply one step's learning rate by 1000, slow one rank down from a
step on (`slow@STEP`: a straggler), stop one (`stop@STEP`: SIGSTOP, a hang), or hold a Ray Data read task
(`read@STEP`) long enough for a test to find it running and SIGKILL it from outside."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from raylm.config import Config
from raylm.config.drills import parse_drills
from raylm.errors import ConfigError
from raylm.log import get_logger

FIRED_MARKER = ".fault-drill-fired"  # in the run folder, a line per fired drill: a restarted group skips them
SPIKE_LR_FACTOR = 1000.0
READ_STALL_S = 6.0
SLOW_STEP_S = 0.5  # slow@STEP: what the drill rank adds to each of its steps from STEP on


class FaultDrill:
    """`at(phase, step)` kills this process when a drill names this rank, phase and step, the first time only;
    `poison(engine, step)` and `lr_factor(step)` fire the non-finite and spike drills (STEP = the 0-based step)."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int):
        drills = parse_drills(cfg.fault.drill, cfg.fault.drill_rank)
        self.rank = rank
        self.mine = {(phase, step) for phase, step, drill_rank in drills if drill_rank == rank}
        self.read_steps = {step for phase, step, _ in drills if phase == "read"}  # every data-reading rank
        self.slow_from = min((step for phase, step in self.mine if phase == "slow"), default=None)
        self.marker = run_dir / FIRED_MARKER
        # a spike drill changes every rank's lr, so every rank decides now whether it already fired (a restart)
        self.spikes_due = {
            step for phase, step, _ in drills if phase == "spike" and not self._fired(f"spike@{step}")
        }

    def read_stall_s(self, step: int) -> float:
        """How long the first read task of a training stream opened at `step` waits (0: no drill there)."""
        return READ_STALL_S if step in self.read_steps else 0.0

    def at(self, phase: str, step: int) -> None:
        if phase == "step":
            self._slow_or_stop(step)
        if (phase, step) not in self.mine or self._fired(f"{phase}@{step}"):
            return
        self._mark(f"{phase}@{step}")
        get_logger().warning(
            "fault drill: killing this worker (pid %d) at %s of step %d", os.getpid(), phase, step
        )
        os.kill(os.getpid(), signal.SIGKILL)

    def _slow_or_stop(self, step: int) -> None:
        """After a step: slow@STEP sleeps after every step from STEP on (it lasts, and is not marked as fired);
        stop@STEP SIGSTOPs this process once (a wedged rank: its sockets stay open, its peers wait)."""
        if self.slow_from is not None and step > self.slow_from:
            time.sleep(SLOW_STEP_S)
        if ("stop", step) in self.mine and not self._fired(f"stop@{step}"):
            self._mark(f"stop@{step}")
            get_logger().warning(
                "fault drill: stopping this worker (pid %d) after step %d", os.getpid(), step
            )
            os.kill(os.getpid(), signal.SIGSTOP)

    def poison(self, engine, step: int) -> None:
        """nonfinite@STEP: the drill rank's first micro-batch loss of step STEP becomes NaN."""
        if ("nonfinite", step) not in self.mine or self._fired(f"nonfinite@{step}"):
            return
        if not engine.computes_loss:
            raise ConfigError(
                f"fault.drill_rank={self.rank} is on pipeline stage {engine.coords.pp_stage}, which "
                f"computes no loss; pick a rank of the last stage for fault.drill=nonfinite@{step}"
            )
        self._mark(f"nonfinite@{step}")
        get_logger().warning("fault drill: rank %d makes a micro-batch loss of step %d NaN", self.rank, step)
        engine.poison_next_loss()

    def lr_factor(self, step: int) -> float:
        """spike@STEP: step STEP trains at 1000 x its lr on every rank."""
        if step not in self.spikes_due:
            return 1.0
        self.spikes_due.discard(step)
        if ("spike", step) in self.mine:
            self._mark(f"spike@{step}")
            get_logger().warning(
                "fault drill: step %d trains at %g x its learning rate", step, SPIKE_LR_FACTOR
            )
        return SPIKE_LR_FACTOR

    def _mark(self, drill: str) -> None:
        with self.marker.open("a") as marker:
            marker.write(f"{drill}\n")

    def _fired(self, drill: str) -> bool:
        return self.marker.exists() and drill in self.marker.read_text().split()
