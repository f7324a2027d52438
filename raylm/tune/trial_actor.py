"""A one-worker trial trained in its own Tune actor: the rank's loop runs there, without a nested TorchTrainer.

A trial of one CPU worker gains nothing from Ray Train's controller and worker group but their start: two more
actors and their imports, seconds per trial, and every ASHA promotion of a paused trial is one more start. Such a
trial's Tune actor takes the worker's CPUs and runs the rank itself, in a process group of one (gloo); Tune
reuses the actor for the next trial (`reuse_actors`), so torch, DeepSpeed and the group are set up once per
actor. The loop reports to Tune what TuneReportCallback passes on from a Ray Train worker: the row, with
`checkpoint_path` for a committed checkpoint."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from raylm.config import Config
from raylm.config.layout import is_elastic, num_workers
from raylm.storage.location import Location
from raylm.train.reporter import Reporter
from raylm.train.startup import StartupMarks

CHECKPOINT_PATH_KEY = "checkpoint_path"  # ray.tune.integration.ray_train's key for a report's checkpoint


def trains_in_trial_actor(cfg: Config, use_gpu: bool) -> bool:
    """Whether every trial of the sweep trains in its Tune actor: one worker on CPUs, no elastic range, no
    worker-group restarts asked (fault.max_failures; Tune's own trial restarts, tune.max_failures, still apply).
    The sweep also refuses it when its space searches a parallel key (a trial could get more workers)."""
    return (
        num_workers(cfg) == 1 and not use_gpu and not is_elastic(cfg.parallel) and cfg.fault.max_failures == 0
    )


class TuneReporter(Reporter):
    """Inside a trial's Tune actor: tune.report, which returns once Tune has taken the result."""

    def report(self, row: dict[str, Any]) -> None:
        from ray import tune

        tune.report(row)

    def report_checkpoint(self, row: dict[str, Any], path: Location | None) -> None:
        from ray import tune

        tune.report({**row, CHECKPOINT_PATH_KEY: str(path)} if path is not None else row)

    def workers_per_node(self) -> int:
        return 1


_begun = {"trials": 0}  # trials this process has begun


def trial_startup() -> StartupMarks:
    """A trial's start-up marks (raylm.train.startup), from its launch: the actor process's start for its first
    trial, else now (a trial Tune runs in a reused actor)."""
    first = _begun["trials"] == 0
    _begun["trials"] += 1
    marks = StartupMarks.from_process_start() if first else StartupMarks()
    marks.mark("launched")  # where /proc does not say
    marks.mark("train_called")
    return marks


def train_in_trial_actor(cfg: Config, run_dir: Path, startup: StartupMarks) -> None:
    """The trial's one rank, here: logging as rank 0, the trial's torch threads, a process group of one (made
    once per actor, kept for the trials Tune runs next in it), then the loop."""
    import torch
    import torch.distributed as dist

    from raylm.log import setup_logging
    from raylm.train.worker import run_rank

    setup_logging(0, verbose=cfg.run.log_level == "debug")
    torch.set_num_threads(cfg.train.torch_threads or (os.cpu_count() or 1))
    if not dist.is_initialized():
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    run_rank(cfg, "gloo", run_dir, 0, TuneReporter(), startup=startup)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
