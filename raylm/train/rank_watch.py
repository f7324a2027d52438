"""One rank's watch over its steps, for the training loop: stragglers (raylm.train.stragglers) and hang reports
(raylm.train.hangs), set up with one all_gather_object of every rank's node when the worker group starts."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from raylm.config import Config
from raylm.train.hangs import HangWatch, is_collective_timeout
from raylm.train.stragglers import StragglerWatch


class RankWatch:
    """`running(step)` around the loop, `step_ended(step, row)` after each step, on every rank together."""

    def __init__(self, cfg: Config, engine, run_dir: Path, rank: int):
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (node_name(), time.time()))
        nodes = [node for node, _ in every]
        group_time = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(every[0][1]))  # rank 0's start: one folder
        self.stragglers = StragglerWatch(cfg.fault, cfg.train.report_every, engine, rank, nodes)
        self.hangs = HangWatch(
            run_dir, rank, cfg.fault.hang_s, group_time, nodes, engine.collective_in_flight
        )

    @contextlib.contextmanager
    def running(self, step: int) -> Iterator[None]:
        """The watchdog runs for the body; a collective that times out in it writes this rank's hang report."""
        self.hangs.start(step)
        self.stragglers.restart_clock()
        try:
            yield
        except Exception as exc:
            if is_collective_timeout(exc):
                last = next((line for line in reversed(str(exc).splitlines()) if line.strip()), "")
                self.hangs.report(f"a collective timed out: {last.strip()[:200]}")
            raise
        finally:
            self.hangs.stop()

    def step_ended(self, step: int, row: dict) -> None:
        """After each step (`step` steps done): the watchdog's heartbeat; stragglers every report_every steps."""
        self.hangs.beat(step)
        self.stragglers.observe(step, row)


def node_name() -> str:
    """This process's node: its Ray node id inside a Ray worker, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()
