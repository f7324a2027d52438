"""Checkpoint saves that do not stop training: the save step copies the state to host memory and the loop goes on
while a thread per rank writes, hashes and uploads; the manifest-last commit follows once every rank is done.

The commit protocol is raylm.checkpoint.commit's, unchanged: the manifest is written (or uploaded) by rank 0
only after every rank's files are complete, so a kill at any moment of a background save leaves a tmp-* folder
(or a prefix without a manifest), never a checkpoint, and the resume takes the previous one. What moves is
when each part runs:

    save step   every rank: tmp-* folder named, the engine's layers gathered into host copies, RNG and trainer
                state captured (the blocking part; the next optimizer step may change the engine's tensors)
    thread      this rank's files written, hashed, uploaded (no collective)
    each step   poll(): one all-reduce of a done flag; once every rank's thread is done, the file lists are
                gathered and rank 0's thread writes the manifest and prunes; the poll after that reports
                the committed folder on every rank
    wait()      the same, blocking: before the next save, at the last step, at the end of training

Every rank polls at the same steps and takes the same branch (the branch follows the all-reduced flag), so
the collectives stay in step. A failure in a thread is a CheckpointError on every rank at the poll that
finds it, never silent.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from raylm.checkpoint.host_copies import HostCopies
from raylm.checkpoint.state import (
    Records,
    Snapshot,
    commit_snapshot,
    drop_staging,
    gather_written,
    on_rank0,
    open_save,
    take_snapshot,
    write_snapshot,
)
from raylm.config import Config
from raylm.storage.location import Location, as_location

if TYPE_CHECKING:
    from raylm.parallel.engine import Engine


@dataclass
class _InFlight:
    """The one save in flight: its snapshot, its thread's current job, and which half it is in."""

    snapshot: Snapshot
    checkpoints_dir: Location | str
    phase: Callable[[str], None]
    after_commit: Callable[[Location], None]
    job: Future
    waited_s: float  # how long its start waited for the save before it
    blocking_s: float  # how long its start held the loop in all (waiting included)
    started_at: float
    committing: bool = False  # False: the ranks write their files; True: rank 0 commits


class BackgroundSaver:
    """One rank's background saves: start() takes the snapshot (every rank together) and hands the writing to
    this rank's thread; poll() each step and wait() finish them (collectives, every rank together).

    `finished` holds the figures of the last committed save: ckpt_step, ckpt_wait_s (its start waiting for
    the save before it), ckpt_blocking_s (the time its start held the loop, waiting included) and ckpt_save_s
    (from its start to its commit)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="raylm-checkpoint",
            initializer=lambda: set_nice(cfg.checkpoint.writer_nice),
        )
        # the snapshot's buffers, reused by every save (the one before has committed by its start)
        self.host = HostCopies()
        self.in_flight: _InFlight | None = None
        self.finished: dict[str, float] = {}

    def start(
        self,
        engine: Engine,
        checkpoints_dir: Location | str,
        step: int,
        trainer_state: dict,
        rank_state: dict | None,
        phase: Callable[[str], None],
        after_commit: Callable[[Location], None],
    ) -> Location | None:
        """Begin a save of the engine's state now: first wait for the one in flight (returned, once committed,
        or None), then copy this rank's state to host memory and queue its files to the thread."""
        began = time.perf_counter()
        previous = self.wait()
        waited_s = time.perf_counter() - began
        snapshot = open_save(engine, self.cfg, checkpoints_dir, step, trainer_state, rank_state)
        phase("before-files")
        take_snapshot(engine, snapshot, self.host)
        job = self.pool.submit(_write, snapshot, self.cfg, checkpoints_dir, phase)
        now = time.perf_counter()
        self.in_flight = _InFlight(
            snapshot, checkpoints_dir, phase, after_commit, job, waited_s, now - began, started_at=began
        )
        return previous

    def poll(self, block: bool = False) -> Location | None:
        """Move the save in flight on when every rank's thread is done (one all-reduce when a save is in flight,
        nothing otherwise); the committed folder on every rank at the poll that finishes it, else None.
        `block`: wait for this rank's thread first. Raises CheckpointError on every rank if any thread failed."""
        save = self.in_flight
        if save is None:
            return None
        if block:
            wait_for([save.job])
        if not self._every_rank_done(save.job):
            return None
        if not save.committing:
            self._commit(save)
            return None
        self.in_flight = None
        try:
            committed = as_location(on_rank0(lambda: str(save.job.result())))
        finally:
            # only now: the ranks on rank 0's node share its staging folder, which holds the manifest until the
            # commit (rank 0's thread drops it itself)
            if save.snapshot.rank != 0:
                drop_staging(save.snapshot, save.checkpoints_dir)
        self.finished = {
            "ckpt_step": save.snapshot.step,
            "ckpt_wait_s": round(save.waited_s, 4),
            "ckpt_blocking_s": round(save.blocking_s, 4),
            "ckpt_save_s": round(time.perf_counter() - save.started_at - save.waited_s, 4),
        }
        save.phase("after-commit")
        return committed

    def wait(self) -> Location | None:
        """Finish the save in flight, if any (every rank together); its committed folder, or None."""
        while self.in_flight is not None:
            committed = self.poll(block=True)
            if committed is not None:
                return committed
        return None

    def close(self) -> None:
        """Let the thread go (after wait(); a save left in flight by an error ends as a tmp-* folder)."""
        self.pool.shutdown(wait=False)

    def _every_rank_done(self, job: Future) -> bool:
        pending = torch.tensor([0 if job.done() else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
        return not int(pending.item())

    def _commit(self, save: _InFlight) -> None:
        """Every rank's files are on storage: gather their lists and hand the commit to rank 0's thread."""
        try:
            files, error = save.job.result()
            merged = gather_written(save.snapshot, save.checkpoints_dir, files, error)
        except BaseException:
            self.in_flight = None
            if save.snapshot.rank != 0:  # rank 0 removed what the failed save left (gather_written)
                drop_staging(save.snapshot, save.checkpoints_dir)
            raise
        save.phase("before-commit")
        if save.snapshot.rank == 0:
            save.job = self.pool.submit(_commit_and_prune, save, self.cfg, merged)
        else:
            save.job = _done(None)
        save.committing = True


def set_nice(nice: int) -> None:
    """Give the calling thread this nice value (Linux: nice is per thread; elsewhere nothing changes). At 19 a
    core the step wants goes to the step first, and the kernel gives the thread's own I/O best-effort's lowest
    level. Not SCHED_IDLE: measured, it starved the writer (3.6 GB into the page cache took 187 s; one step
    beside it took 25.8 s)."""
    if sys.platform == "linux" and nice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _write(
    snapshot: Snapshot, cfg: Config, checkpoints_dir: Location | str, phase: Callable[[str], None]
) -> tuple[Records, str | None]:
    """The thread's first job: this rank's files. Any failure comes back as the error every rank raises."""
    try:
        return write_snapshot(snapshot, cfg, checkpoints_dir, phase)
    except Exception as exc:  # noqa: BLE001 - reported at the next poll on every rank, never lost
        return (
            {},
            f"checkpoint step {snapshot.step} failed on rank {snapshot.rank}: {type(exc).__name__}: {exc}",
        )


def _commit_and_prune(save: _InFlight, cfg: Config, files: Records) -> Location:
    """Rank 0's second job: the manifest last, then whatever follows a commit (pruning older checkpoints)."""
    try:
        committed = commit_snapshot(save.snapshot, cfg, save.checkpoints_dir, files)
    finally:
        drop_staging(save.snapshot, save.checkpoints_dir)
    save.after_commit(committed)
    return committed


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
