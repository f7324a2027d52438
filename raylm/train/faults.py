"""Fault drills (fault.drill): SIGKILL one worker once per run at a named point, to rehearse recovery for real."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from raylm.config import Config
from raylm.log import get_logger

FIRED_MARKER = ".fault-drill-fired"  # in the run folder: a restarted worker group does not fire the drill again


class FaultDrill:
    """`at(phase, step)` kills this process when the drill names this rank, phase and step, the first time only."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int):
        phase, _, step = cfg.fault.drill.partition("@")
        self.armed = bool(cfg.fault.drill) and rank == cfg.fault.drill_rank
        self.phase, self.step = phase, int(step or 0)
        self.marker = run_dir / FIRED_MARKER

    def at(self, phase: str, step: int) -> None:
        if not self.armed or phase != self.phase or step != self.step or self.marker.exists():
            return
        self.marker.write_text(f"{phase}@{step}\n")
        get_logger().warning("fault drill: killing this worker (pid %d) at %s of step %d", os.getpid(), phase, step)
        os.kill(os.getpid(), signal.SIGKILL)
