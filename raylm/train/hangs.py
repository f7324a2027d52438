"""Hang reports: when no step ends within fault.hang_s, or a collective times out, every live rank writes where it
is to <run>/hangs/<time>/rank-NNNNN.txt before the worker group fails and restarts.

A stopped rank (SIGSTOP, a wedged node) holds its sockets open: its peers wait in their next collective and see
nothing wrong until the collective's timeout. A watchdog thread in each rank notices when no step has ended for
fault.hang_s, writes the report and then ends the process (SIGKILL, so that whatever runs the ranks restarts the
group as for a lost worker); a collective that times out writes the report on its way out. Each report holds the
rank, its node and pid, the torch.distributed call it is blocked in and on which ranks (raylm.parallel.comm_wait),
every rank's node, every thread's Python stack (faulthandler) and, where py-spy is installed, `py-spy dump`
(native frames too). The ranks of one worker group agree on <time> when it starts (the UTC time of rank 0's
start), so one group's reports share a folder; a rank with no report there did not get to write one: stopped, or
gone.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch.distributed as dist

from raylm.log import get_logger
from raylm.parallel.comm_wait import InFlight
from raylm.storage.atomic import write_atomic
from raylm.storage.file_names import HANGS_DIR

REPORT_GRACE_S = 2.0  # after its report, how long a rank waits for its peers' before it ends the group
PY_SPY_TIMEOUT_S = 20.0
# gloo: "Timed out waiting ... for recv operation"; NCCL: "Watchdog caught collective operation timeout"
TIMEOUT_MARKS = ("timed out", "timeout")


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether an exception is a torch.distributed call that timed out (a peer that went away is not a hang: the
    driver's line names the rank that died)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError | dist.DistError) and any(mark in text for mark in TIMEOUT_MARKS)


def report_path(run_dir: Path, group_time: str, rank: int) -> Path:
    return Path(run_dir) / HANGS_DIR / group_time / f"rank-{rank:05d}.txt"


class HangWatch:
    """One rank's watchdog: `beat(step)` after every step; `report(reason)` writes this rank's report."""

    def __init__(self, run_dir: Path, rank: int, hang_s: float, group_time: str, nodes: list[str], in_flight):
        self.path = report_path(run_dir, group_time, rank)
        self.rank, self.hang_s, self.nodes = rank, hang_s, nodes  # nodes: every rank's, in rank order
        self.in_flight = in_flight  # () -> InFlight | None: the engine's call in flight
        self.last_step, self.last_beat = -1, time.monotonic()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, step: int) -> None:
        self.beat(step)
        if self.hang_s > 0:
            self.thread = threading.Thread(target=self._watch, name="raylm-hang-watch", daemon=True)
            self.thread.start()

    def beat(self, step: int) -> None:
        self.last_step, self.last_beat = step, time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        poll_s = min(1.0, self.hang_s / 10)
        while not self.stopped.wait(poll_s):
            if time.monotonic() - self.last_beat > self.hang_s:
                self.report(f"no step ended within fault.hang_s={self.hang_s:g} s")
                time.sleep(REPORT_GRACE_S)  # the peers' watchdogs fire within moments of this one
                os.kill(os.getpid(), signal.SIGKILL)

    def report(self, reason: str) -> Path:
        """Write this rank's report (once)."""
        if self.path.exists():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = self._header(reason)
        stacks = self.path.with_name(f".{self.path.name}.stacks")
        with stacks.open("w") as out:  # faulthandler writes to a file descriptor
            faulthandler.dump_traceback(out, all_threads=True)
        text = head + "\n\nPython stacks (faulthandler, most recent call first):\n" + stacks.read_text()
        stacks.unlink()
        text += _py_spy_dump()
        write_atomic(self.path, text)
        # the console's line is the driver's, one per fault (raylm.train.fault_lines); this one is for --verbose
        get_logger().debug("rank %d: %s; its stacks are in %s", self.rank, reason, self.path)
        return self.path

    def _header(self, reason: str) -> str:
        since = time.monotonic() - self.last_beat
        lines = [
            f"rank {self.rank} on node {self.nodes[self.rank]}, pid {os.getpid()}",
            f"reason: {reason}",
            f"last step ended: {self.last_step} ({since:.1f} s ago)",
            f"blocked in: {describe_in_flight(self.in_flight())}",
            f"world: {len(self.nodes)} ranks",
            *(f"node of rank {rank}: {node}" for rank, node in enumerate(self.nodes)),
        ]
        return "\n".join(lines)


def describe_in_flight(call: InFlight | None) -> str:
    if call is None:
        return "no torch.distributed call"
    ranks = ", ".join(map(str, call.group_ranks)) or "?"
    return f"torch.distributed.{call.call} with ranks [{ranks}] for {time.monotonic() - call.since:.1f} s"


def _py_spy_dump() -> str:
    """`py-spy dump` of this process where py-spy is installed (it needs ptrace rights), else nothing."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return ""
    try:
        done = subprocess.run(  # noqa: S603  (a fixed argument list: py-spy on this process)
            [py_spy, "dump", "--native", "--pid", str(os.getpid())],
            capture_output=True,
            text=True,
            timeout=PY_SPY_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"\n\npy-spy dump failed: {exc}\n"
    return f"\n\npy-spy dump --native:\n{done.stdout}{done.stderr}"
