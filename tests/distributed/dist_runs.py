"""Training runs without Ray: raylm's Trainer on gloo ranks in plain spawned processes, with a PlainReporter.

The parent does what `raylm train`'s driver does before its workers start (raylm.train.driver.prepared_run)
and what Ray Train does around them: it starts the group, and after a lost rank (a process that died, as a
fault drill's SIGKILL does) stops the others and starts the group again, up to fault.max_failures times; a
RaylmError ends the run with the driver's one line, "training failed: ...", and is never retried. Several runs
of one world size train one after another in one process group (train_many), as test_parity.py batches
layouts.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from pathlib import Path

import torch
from dist_harness import TIMEOUT_S, LostRank, collect, spawn_ranks

from raylm.config import Config, resolve, to_dict
from raylm.config.layout import num_workers
from raylm.errors import RaylmError
from raylm.train.driver import prepared_run, with_absolute_paths
from raylm.train.metrics import read_metrics

STEPS = ("train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=2")  # the fault and resume runs
PP2 = (*STEPS, "parallel.pp=2")
DP2 = (*STEPS, "parallel.dp=2")  # rank 1 computes the loss of DP replica 1
GROUP_TIMEOUT_S = 3 * TIMEOUT_S  # a group trains several runs


def train_jobs(rank: int, world_size: int, jobs: list[tuple[dict, str]]) -> list[dict]:
    """Rank worker: train each (config tree, run folder) in turn; a RaylmError (the same on every rank) ends
    its own run only. Session.build starts the process group."""
    import torch.distributed as dist

    from raylm.storage.location import as_location
    from raylm.train.reporter import PlainReporter
    from raylm.train.worker import run_rank

    results = []
    for tree, run_dir in jobs:
        try:
            reporter = PlainReporter(workers_per_node=world_size)  # every rank on this machine
            run_rank(resolve(tree), "gloo", as_location(run_dir), rank, reporter)
            results.append({"error": None})
        except RaylmError as exc:
            results.append({"error": str(exc), "exit_code": exc.exit_code})
        dist.barrier()  # the next run starts together
    return results


def _rank_main(rank: int, world_size: int, port: int, jobs, results) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)  # world_size ranks share 2 cores: one thread each
    try:
        from raylm.log import setup_logging

        setup_logging(rank)
        buffer = io.BytesIO()
        torch.save(train_jobs(rank, world_size, jobs), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent rather than hanging it
        results.put((rank, "error", traceback.format_exc()))


def _run_group(world_size: int, jobs: list[tuple[dict, str]]) -> list[list[dict]]:
    """One start of the group: every rank's results, in rank order; LostRank when a process died."""
    procs, results = spawn_ranks(world_size, _rank_main, jobs)
    return collect(procs, results, GROUP_TIMEOUT_S)


def train_many(cfgs: list[Config], world_size: int, max_failures: int = 0) -> list[RaylmError | None]:
    """Train each run in turn in one group of `world_size` plain processes; per run, None or the driver's
    error.
    A lost rank restarts the whole group (every run resumes or starts again as its folder says)."""
    cfgs = [with_absolute_paths(cfg) for cfg in cfgs]
    with contextlib.ExitStack() as held:
        folders = [str(held.enter_context(prepared_run(cfg))) for cfg in cfgs]
        jobs = [(to_dict(cfg), folder) for cfg, folder in zip(cfgs, folders, strict=False)]
        for attempt in range(max_failures + 1):
            try:
                per_rank = _run_group(world_size, jobs)
                break
            except LostRank:
                if attempt == max_failures:
                    raise
    return [_driver_error(result) for result in per_rank[0]]


def _driver_error(result: dict) -> RaylmError | None:
    """What raylm.train.driver raises for a worker's RaylmError: one line, the error's own exit code."""
    if result["error"] is None:
        return None
    failure = RaylmError(f"training failed: {result['error']}")
    failure.exit_code = result["exit_code"]
    return failure


def train_plain(cfg: Config, world_size: int) -> None:
    """One run in plain processes, with the restarts fault.max_failures allows; raises the driver's error."""
    (error,) = train_many([cfg], world_size, cfg.fault.max_failures)
    if error is not None:
        raise error


def world_of(cfg: Config) -> int:
    return num_workers(cfg)  # the layout's own world size (pp * cp * tp * dp)


def run_losses(cfg: Config) -> list[tuple[float, str]]:
    """Each step's (loss, samples_sha): a resumed run must match an uninterrupted one in both, exactly."""
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(cfg.train.max_steps)), "each step logged once, in order"
    return [(r["loss"], r["samples_sha"]) for r in rows]


def committed(cfg: Config) -> list[str]:
    folder = Path(cfg.run.dir) / cfg.run.name / "checkpoints"
    if not folder.exists():  # a run killed before its first commit
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))
