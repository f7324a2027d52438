"""Fault drills (fault.drill): SIGKILL a worker at named points of a run, each once, to rehearse recovery for real;
`read@STEP` instead holds the first Ray Data read task of a stream opened at STEP for READ_STALL_S, so that a test
can find that task running and SIGKILL it from outside."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from raylm.config import Config
from raylm.log import get_logger

FIRED_MARKER = ".fault-drill-fired"  # in the run folder, a line per fired drill: a restarted group skips them
READ_STALL_S = 6.0


def parse_drills(text: str, default_rank: int) -> list[tuple[str, int, int]]:
    """'PHASE@STEP[:RANK],...' -> [(phase, step, rank), ...]; a drill without :RANK kills fault.drill_rank."""
    drills = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, rank = item.partition(":")
        phase, _, step = point.partition("@")
        drills.append((phase, int(step or 0), int(rank) if rank else default_rank))
    return drills


class FaultDrill:
    """`at(phase, step)` kills this process when a drill names this rank, phase and step, the first time only."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int):
        drills = parse_drills(cfg.fault.drill, cfg.fault.drill_rank)
        self.mine = {(phase, step) for phase, step, drill_rank in drills if drill_rank == rank}
        self.read_steps = {step for phase, step, _ in drills if phase == "read"}  # every data-reading rank
        self.marker = run_dir / FIRED_MARKER

    def read_stall_s(self, step: int) -> float:
        """How long the first read task of a training stream opened at `step` waits (0: no drill there)."""
        return READ_STALL_S if step in self.read_steps else 0.0

    def at(self, phase: str, step: int) -> None:
        if (phase, step) not in self.mine or self._fired(f"{phase}@{step}"):
            return
        with self.marker.open("a") as marker:
            marker.write(f"{phase}@{step}\n")
        get_logger().warning("fault drill: killing this worker (pid %d) at %s of step %d", os.getpid(), phase, step)
        os.kill(os.getpid(), signal.SIGKILL)

    def _fired(self, drill: str) -> bool:
        return self.marker.exists() and drill in self.marker.read_text().split()
