"""One Ray Train worker = one (pp, tp, dp) rank: set the process up, build the engine and streams, train."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from raylm.train.startup import StartupMarks

if TYPE_CHECKING:
    from raylm.config import Config
    from raylm.storage.location import Location
    from raylm.train.elastic import ResizeHandshake
    from raylm.train.reporter import Reporter


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entrypoint: every rank runs this with the resolved config as a plain dict. The module imports
    nothing heavy at its top, so that the start-up's import phase is timed here (raylm.train.startup)."""
    startup = StartupMarks(loop_config.get("startup"))
    startup.mark("worker_entered")
    import ray.train
    import torch

    from raylm.parallel.ds_import import import_deepspeed

    import_deepspeed()  # timed with the others (Session.build would import it)
    from raylm.config import resolve
    from raylm.config.layout import is_elastic
    from raylm.log import get_logger, quiet_worker_logs, setup_logging
    from raylm.storage.location import as_location
    from raylm.train.elastic import ResizeChannel, ResizeHandshake, config_for_group
    from raylm.train.loop import Trainer
    from raylm.train.placement import record_placement
    from raylm.train.reporter import RayTrainReporter
    from raylm.train.run_records import RunFiles
    from raylm.train.session import Session

    startup.mark("imports_done")
    context = ray.train.get_context()
    cfg = config_for_group(resolve(loop_config["config"]), context.get_world_size())
    rank = context.get_world_rank()
    setup_logging(rank, verbose=cfg.run.log_level == "debug")
    quiet_worker_logs()
    torch.set_num_threads(_torch_threads(cfg, context.get_local_world_size()))
    _pin_gpu()
    reporter = RayTrainReporter()
    session = Session.build(cfg, loop_config["backend"], rank, reporter.workers_per_node())
    startup.mark("engine_built")
    run = as_location(loop_config["run_dir"])
    files = RunFiles(run, cfg.data.cache_dir)
    placement = record_placement(files.local, rank, session.engine.coords)
    files.push((placement.relative_to(files.local).as_posix(),))  # each rank its own file
    resize = (
        ResizeHandshake(ResizeChannel(loop_config["resize_channel"]), rank)
        if is_elastic(cfg.parallel)
        else None
    )
    if resize and rank == 0:
        get_logger().info(
            "elastic run: this worker group trains with dp=%d (range %d..%d)",
            cfg.parallel.dp,
            cfg.parallel.dp_min,
            cfg.parallel.dp_max,
        )
    Trainer(cfg, session, run, rank, reporter, resize, startup if rank == 0 else None).train()


def _pin_gpu() -> None:
    """Make this worker's GPU (the one Ray Train assigned) torch's current device and DeepSpeed's.

    Ray Train shows every GPU of a node to each of its workers there and sets LOCAL_RANK to the worker's local
    rank, while DeepSpeed places its modules on cuda:LOCAL_RANK: the two need not name the same GPU. Pointing
    both at Ray's device keeps one worker per GPU, the one Ray accounted for."""
    import torch

    if not torch.cuda.is_available():
        return
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    os.environ["LOCAL_RANK"] = str(device.index)


def _torch_threads(cfg: Config, workers_on_node: int) -> int:
    """Threads per worker from the node's cores and the workers placed on it (Ray would leave one:
    docs/ray-facts.md 1)."""
    return cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers_on_node)


def run_rank(
    cfg: Config,
    backend: str,
    run_dir: Location,
    rank: int,
    reporter: Reporter,
    resize: ResizeHandshake | None = None,
    startup: StartupMarks | None = None,
) -> None:
    """Build this rank's engine and streams, then train: a rank in a plain process (torch.distributed's
    environment set by its launcher; reporter a PlainReporter) or in a sweep trial's Tune actor (startup: its
    marks, written at the first step when this is rank 0)."""
    from raylm.train.loop import Trainer
    from raylm.train.session import Session

    session = Session.build(cfg, backend, rank, reporter.workers_per_node())
    if startup is not None:
        startup.mark("engine_built")
    Trainer(cfg, session, run_dir, rank, reporter, resize, startup if rank == 0 else None).train()
