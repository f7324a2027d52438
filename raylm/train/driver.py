"""`raylm train`: check the run, connect to Ray, run a TorchTrainer shaped by the Topology, summarise the result."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raylm.config import Config, to_dict, with_overrides
from raylm.config.layout import is_elastic, replica_workers, worker_range
from raylm.data.readers_lock import reading
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.model.weights import check_init_from
from raylm.ray_connect import connect_ray, placement_group_cleaner_works
from raylm.storage.file_names import LOSS_PLOT_FILE, METRICS_FILE
from raylm.storage.location import Location, is_remote
from raylm.storage.uri import is_uri
from raylm.train.kv import open_kv
from raylm.train.metrics import plot_loss_curve, read_metrics
from raylm.train.planning import choose_layout, cluster_shape, preflight
from raylm.train.preflight import check_prepared_data, local_data_folders
from raylm.train.run_folder import checkpoint_root, prepare_run_dir, run_path
from raylm.train.run_lock import hold_run_lock
from raylm.train.run_records import RunFiles
from raylm.train.startup import StartupMarks

DATA_CPU_RESERVE = 1.0  # CPUs left free on a CPU-only cluster so Ray Data tasks are never starved (hang 2)


def train(
    cfg: Config,
    overwrite: bool = False,
    allow_config_change: bool = False,
    force: bool = False,
    startup: StartupMarks | None = None,
) -> dict[str, Any]:
    """Run training end to end and return a summary; every failure surfaces here as one RaylmError.

    allow_config_change: resume even when the seed, data, tokenizer or model shape differ from the checkpoint's.
    force: train a layout the planner predicts will not fit in memory. startup: the marks so far (the CLI's
    process start), which the run completes in <run>/startup.jsonl (raylm.train.startup)."""
    start = time.perf_counter()
    startup = startup or StartupMarks()
    startup.mark("train_called")
    cfg = check_init_from(with_absolute_paths(cfg))
    prediction = None
    if cfg.parallel.layout == "auto":  # the layout depends on the cluster: connect first, then write the run
        connect_ray()
        cfg, prediction = choose_layout(cfg, cluster_shape())
    with prepared_run(cfg, overwrite, allow_config_change) as run_dir:
        connect_ray()
        startup.mark("ray_ready")
        if prediction is None and not force:
            prediction = preflight(cfg, cluster_shape())
        if is_elastic(cfg.parallel):
            open_kv()  # on this node: the elastic resize handshake goes through it
        trainer = build_trainer(cfg, run_dir, startup=startup)
        get_logger().info("training %s on %s; run folder %s", cfg.run.name, _layout_text(cfg), run_dir)
        if is_elastic(cfg.parallel) and not cfg.fault.max_failures:
            get_logger().warning(
                "fault.max_failures=0: a lost node ends this elastic run instead of shrinking it; "
                "set fault.max_failures to the node losses it should survive"
            )
        startup.mark("fit_called")
        result = _fit(trainer, run_dir)
        summary = summarise(run_dir, result, time.perf_counter() - start, cfg.data.cache_dir)
        finish_tracking(run_dir, cfg.data.cache_dir)
        if prediction is not None and prediction.time is not None:
            summary["predicted_tokens_per_s"] = round(prediction.tokens_per_s, 1)
            get_logger().info(
                "measured %s tokens/s against %.0f predicted for this layout",
                summary["tokens_per_s"],
                prediction.tokens_per_s,
            )
        return summary


@contextmanager
def prepared_run(
    cfg: Config, overwrite: bool = False, allow_config_change: bool = False
) -> Iterator[Location]:
    """The run folder, checked and ready for its workers, held for the body (whatever runs the ranks: Ray
    Train, or plain processes). The lock comes before anything reads, replaces or writes the run; reading() keeps
    prepare off its shards. `cfg` has absolute paths (with_absolute_paths)."""
    with hold_run_lock(run_path(cfg), cfg.data.cache_dir), reading(local_data_folders(cfg)):
        check_prepared_data(cfg)
        yield prepare_run_dir(cfg, overwrite=overwrite, allow_config_change=allow_config_change)


def _layout_text(cfg: Config) -> str:
    """`4 worker(s) (pp=2 tp=1 dp=2)`, or for an elastic run the range of workers and of dp."""
    p = cfg.parallel
    lo, hi = worker_range(cfg)
    if not is_elastic(p):
        return f"{hi} worker(s) (pp={p.pp} tp={p.tp} dp={p.dp})"
    return f"{lo} to {hi} workers (pp={p.pp} tp={p.tp} dp={p.dp_min}..{p.dp_max}, elastic)"


def with_absolute_paths(cfg: Config) -> Config:
    """Workers do not start in the caller's folder: pin every relative path of the config to it (URIs stay as
    they are: `s3://b/x` is not a path under the working folder)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path and not is_uri(path) else path

    sources = [{**source, "path": absolute(source["path"])} for source in cfg.data.sources]
    # data.paths keep their symlinks (a corpus file's path is its identity) and their globs: abspath, not resolve.
    paths = [p if is_uri(p) else os.path.abspath(os.path.expanduser(p)) for p in cfg.data.paths]
    return with_overrides(
        cfg,
        {
            "run.dir": absolute(cfg.run.dir),
            "data.out_dir": absolute(cfg.data.out_dir),
            "data.tokenizer": absolute(cfg.data.tokenizer),
            "data.sources": sources,
            "data.cache_dir": absolute(cfg.data.cache_dir),
            "data.paths": paths,
            "model.init_from": absolute(cfg.model.init_from),
        },
    )


def build_trainer(
    cfg: Config, run_dir: Location, callbacks: list | None = None, startup: StartupMarks | None = None
):
    """The TorchTrainer for a run: workers and resources from the layout, storage in run.dir, retries from fault.
    `startup`: the driver's start-up marks, which rank 0 completes (the dict goes with the loop config, so the
    marks still to come are taken then, by reference)."""
    import ray.train
    from ray.train.torch import TorchConfig

    from raylm.train.trainer import ElasticGroup, RaylmTrainer
    from raylm.train.worker import train_loop_per_worker

    scaling, backend = scaling_for(cfg, _cluster_resources())
    channel = f"resize/{uuid.uuid4().hex}"  # this run's resize handshake (raylm.train.elastic)
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        **ray_storage(run_dir),
        failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
        callbacks=callbacks,
    )
    loop_config = {
        "config": to_dict(cfg),
        "run_dir": str(run_dir),
        "backend": backend,
        "resize_channel": channel,
        "startup": startup.marks if startup else {},
    }
    # No `datasets=`: Ray Train's default DataConfig would split them across every worker, and ranks that do not
    # read data (middle pipeline stages) would leave the split coordinator waiting forever (hang 1).
    trainer = RaylmTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend, timeout_s=cfg.fault.collective_timeout_s),
    )
    if not is_remote(run_dir):
        trainer.run_dir = Path(str(run_dir))
    trainer.placement_group_cleaner = placement_group_cleaner_works()
    if is_elastic(cfg.parallel):
        trainer.elastic = ElasticGroup(
            tp=cfg.parallel.tp, replica_workers=replica_workers(cfg.parallel), channel=channel
        )
    return trainer


def ray_storage(run_dir: Location) -> dict[str, Any]:
    """RunConfig's storage for the run: its parent folder, or for a prefix the bucket path with the pyarrow
    filesystem raylm built from the environment (credentials stay in the environment, never in the object)."""
    if not is_remote(run_dir):
        return {"storage_path": str(run_dir.parent)}
    from raylm.storage.fs import filesystem

    return {"storage_path": run_dir.parent.path, "storage_filesystem": filesystem(run_dir)}


def scaling_for(cfg: Config, cluster: dict[str, float]):
    """ScalingConfig and process-group backend: a GPU per worker when asked or available, else fractional CPUs.
    An elastic run (a parallel.dp range) gets Ray's elastic worker count, pp*tp*dp_min to pp*tp*dp_max."""
    from ray.train import ScalingConfig

    fewest, workers = worker_range(cfg)
    product = "pp*tp*dp_min" if is_elastic(cfg.parallel) else "pp*tp*dp"
    use_gpu = {"true": True, "false": False}.get(cfg.parallel.use_gpu, cluster.get("GPU", 0) >= fewest)
    if use_gpu and cluster.get("GPU", 0) < fewest:
        raise RaylmError(
            f"parallel.use_gpu=true needs {fewest} GPUs ({product}) but the cluster has "
            f"{cluster.get('GPU', 0):g}; add GPU nodes or lower the degrees"
        )
    cpus = cfg.parallel.cpus_per_worker or _auto_cpus_per_worker(workers, cluster.get("CPU", 1), use_gpu)
    resources = {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus}
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
    if is_elastic(cfg.parallel):
        # ray.train.ScalingConfig is Train v2's at run time (elastic (min, max) workers, a monitor interval);
        # its annotations name v1's class, which has neither (hence the ignore).
        return ScalingConfig(
            num_workers=(fewest, workers),  # type: ignore[call-arg, arg-type]
            use_gpu=use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.fault.resize_check_s,
        ), backend
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources), backend


def _auto_cpus_per_worker(workers: int, cluster_cpus: float, use_gpu: bool) -> float:
    """One CPU per GPU worker; on CPU clusters a share of the CPUs that leaves DATA_CPU_RESERVE for Ray Data."""
    if use_gpu:
        return 1.0
    share = (cluster_cpus - DATA_CPU_RESERVE) / workers
    if share >= 1.0:
        return float(int(share))  # Ray accepts fractions only below one CPU
    return max(0.05, int(share * 20) / 20)


def _cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def _fit(trainer, run_dir: Location):
    """trainer.fit(), with a worker's failure turned into one line that names the cause, and a SIGINT or
    SIGTERM into one that names the checkpoint a rerun resumes from."""
    from raylm.train.failure_policy import user_error_in
    from raylm.train.interrupt import interrupted_error

    try:
        result = trainer.fit()
    except (Exception, KeyboardInterrupt) as exc:  # Ray wraps worker errors; unwrap to the user's cause
        if trainer.interrupted_by is not None:
            raise interrupted_error(trainer.interrupted_by, _newest_checkpoint(run_dir)) from None
        if isinstance(exc, KeyboardInterrupt):
            raise
        failure = RaylmError(f"training failed: {_root_cause(exc, run_dir)}")
        user_error = user_error_in(exc)
        if user_error is not None:  # a data, config or checkpoint error keeps its own exit code (3, 2, 4)
            failure.exit_code = user_error.exit_code
        raise failure from exc
    if trainer.interrupted_by is not None:  # the signal came as the run was finishing on its own
        get_logger().warning("the run finished before the interrupt took effect")
    if getattr(result, "error", None):
        raise RaylmError(f"training failed: {_root_cause(result.error, run_dir)}")
    return result


def _root_cause(exc: BaseException, run_dir: Location | None = None) -> str:
    """The innermost exception's one-line message (a RaylmError's text is already written for users; a storage
    error of Ray Train's own writes to a run on object storage is described as raylm's are, scrubbed)."""
    seen = exc
    while seen.__cause__ is not None or getattr(seen, "cause", None) is not None:
        # Ray's wrapped errors carry `cause` (checked by the getattr above); BaseException has none.
        seen = seen.__cause__ or seen.cause  # type: ignore[attr-defined]
    if run_dir is not None and is_remote(run_dir) and not isinstance(seen, RaylmError):
        from raylm.storage.fs import DENIED, NO_BUCKET, UNREACHABLE, describe

        if any(mark in str(seen) for mark in UNREACHABLE + DENIED + NO_BUCKET):  # Ray passes the text on
            return describe(seen, run_dir, "write the run to")
    text = str(seen).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(seen).__name__).strip()
    return re.sub(r"^raylm\.errors\.\w+: ", "", last)  # our errors are already worded for users


def _newest_checkpoint(run_dir: Location) -> str | None:
    from raylm.checkpoint.commit import list_committed

    committed = list_committed(checkpoint_root(run_dir))
    return str(committed[0]) if committed else None


def summarise(run_dir: Location, result, wall_s: float, cache_dir: str = "") -> dict[str, Any]:
    """Final summary printed by the CLI: where things are and how the run ended. For a run on object storage the
    metrics come from its prefix, and loss.png goes there."""
    files = RunFiles(run_dir, cache_dir)
    files.pull(METRICS_FILE)
    rows = read_metrics(files.local)
    plot: Location | None = plot_loss_curve(files.local, title=run_dir.name)
    if plot is not None and files.push((plot.name,)):
        plot = run_dir / plot.name
    last = rows[-1] if rows else {}
    evals = [r for r in rows if "val_loss" in r]
    summary = {
        "run_dir": str(run_dir),
        "steps": last.get("step", -1) + 1,
        "tokens": last.get("tokens", 0),
        "first_loss": _rounded(rows[0]["loss"] if rows else None, 4),
        "final_loss": _rounded(last.get("loss"), 4),
        "val_loss": _rounded(evals[-1]["val_loss"] if evals else None, 4),
        "tokens_per_s": _rounded(last.get("tokens_per_s"), 1),
        "wall_s": round(wall_s, 1),
        "loss_curve": str(plot) if plot else None,
        "checkpoint": _newest_checkpoint(run_dir),
    }
    val = f"{summary['val_loss']:.3f}" if summary["val_loss"] is not None else "none"
    get_logger().info(
        "done: %d steps, loss %.3f -> %.3f, val_loss %s, %.0f s; %s",
        summary["steps"],
        summary["first_loss"] or 0,
        summary["final_loss"] or 0,
        val,
        wall_s,
        run_dir,
    )
    return summary


def finish_tracking(run_dir: Location, cache_dir: str = "") -> None:
    """The run's MLflow run, when it has one, gets the rows it lacks (rank 0 logged the rest) and loss.png
    (drawn by summarise, after training)."""
    from raylm.train.tracking.after_run import add_artifacts
    from raylm.train.tracking.ids import record_name

    files = RunFiles(run_dir, cache_dir)
    files.pull(record_name("mlflow"))
    plot = files.local / LOSS_PLOT_FILE
    add_artifacts(files.local, (plot,) if plot.exists() else (), rows=read_metrics(files.local))


def _rounded(value: float | None, digits: int) -> float | None:
    """A summary figure as people read it; metrics.jsonl keeps the full value."""
    return None if value is None else round(value, digits)
