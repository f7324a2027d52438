"""One Ray Train worker = one (pp, tp, dp) rank: build the engine and its data stream, run the step loop."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from raylm.config import Config, resolve
from raylm.config.derived import micro_batches_for
from raylm.config.layout import is_elastic
from raylm.log import get_logger, quiet_worker_logs, setup_logging
from raylm.storage.location import Location, as_location
from raylm.train.checkpoint import checkpoint_due, report_with_checkpoint, save
from raylm.train.elastic import ResizeChannel, ResizeHandshake, config_for_group
from raylm.train.faults import FaultDrill
from raylm.train.placement import record_placement
from raylm.train.progress import Progress
from raylm.train.run_files import RunFiles
from raylm.train.schedule import PlateauState, batch_size_at, lr_at, milestone_crossed, plateau_after_eval
from raylm.train.step import TimedIterator, TrainState, train_step
from raylm.train.step_faults import StepFaults
from raylm.train.rungs import stopped_at_rung, waits_for_decisions


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entrypoint: every rank runs this with the resolved config as a plain dict."""
    import ray.train

    context = ray.train.get_context()
    cfg = config_for_group(resolve(loop_config["config"]), context.get_world_size())
    rank = context.get_world_rank()
    setup_logging(rank, verbose=cfg.run.log_level == "debug")
    quiet_worker_logs()
    torch.set_num_threads(_torch_threads(cfg, context.get_local_world_size()))
    _pin_gpu()
    session = build_session(cfg, loop_config["backend"], rank)
    run = as_location(loop_config["run_dir"])
    files = RunFiles(run, cfg.data.cache_dir)
    placement = record_placement(files.local, rank, session.engine.coords)
    files.push((placement.relative_to(files.local).as_posix(),))  # each rank its own file
    resize = ResizeHandshake(ResizeChannel(loop_config["resize_channel"]), rank) if is_elastic(cfg.parallel) else None
    if resize and rank == 0:
        get_logger().info("elastic run: this worker group trains with dp=%d (range %d..%d)", cfg.parallel.dp,
                          cfg.parallel.dp_min, cfg.parallel.dp_max)
    run_loop(cfg, session, run, rank, resize)


def _pin_gpu() -> None:
    """Make this worker's GPU (the one Ray Train assigned) torch's current device and DeepSpeed's.

    Ray Train shows every GPU of a node to each of its workers there and sets LOCAL_RANK to the worker's local
    rank, while DeepSpeed places its modules on cuda:LOCAL_RANK: the two need not name the same GPU. Pointing
    both at Ray's device keeps one worker per GPU, the one Ray accounted for."""
    if not torch.cuda.is_available():
        return
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    os.environ["LOCAL_RANK"] = str(device.index)


def _torch_threads(cfg: Config, workers_on_node: int) -> int:
    """Threads per worker from the node's cores and the workers placed on it (Ray would leave one: docs/ray-facts.md 1)."""
    return cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // workers_on_node)


def build_session(cfg: Config, backend: str, rank: int):
    """Engine + streams + metric helpers for this rank."""
    from raylm.train.session import Session

    return Session.build(cfg, backend, rank)


def run_loop(cfg: Config, session, run_dir: Location, rank: int, resize: ResizeHandshake | None = None) -> None:
    """The training loop: schedules per step, train_batch, eval, metrics, checkpoints and reports to Ray.

    The last step always commits a checkpoint: it holds the final weights that generate and export read. Rank 0
    writes the metrics in a local folder (the run folder, or for a run on object storage this machine's folder
    for its prefix, copied there at every report and at the end). In an elastic run a step after which Ray wants
    to resize the group commits one too, and then waits for the resize (raylm.train.elastic)."""
    resumed = session.resume(run_dir, rank)
    state, protect = resumed.state, resumed.source  # keep the resume source until this attempt commits its own
    plateau = resumed.plateau or PlateauState()
    files = RunFiles(run_dir, cfg.data.cache_dir)
    if rank == 0:
        files.start()
    drill = FaultDrill(cfg, files.local, rank)
    stall = drill.read_stall_s(state.step)
    batches = TimedIterator(session.train_batches(state.samples, stall)) if session.reads_data else None
    progress = Progress(cfg, files.local, start_step=state.step) if rank == 0 else None
    faults = StepFaults(cfg, session.engine, resumed.trainer)
    resumed_rung = report_resumed_rung(cfg, session, state) if cfg.tune.trial_of and resumed.source else None
    stopped = stopped_at(cfg, rank, resumed_rung)  # ASHA may stop a trial at the rung it resumed from
    for step in range(state.step, state.step if stopped else cfg.train.max_steps):
        global_batch = batch_size_at(state.tokens, cfg.train.global_batch, cfg.schedule.batch)
        lr = lr_at(step, cfg.optim.lr, cfg.train.max_steps, cfg.schedule.lr, plateau.scale) * drill.lr_factor(step)
        drill.poison(session.engine, step)
        result = train_step(session.engine, batches, micro_batches_for(global_batch, cfg), lr)
        rung = milestone_crossed(state.tokens, state.tokens + global_batch * cfg.data.seq_len, cfg.tune.rung_tokens)
        state, before = state.advance(global_batch, cfg.data.seq_len), state
        row = session.metrics_row(state, result, lr, global_batch)
        if resumed.source and step == resumed.state.step:
            row["resumed_from"] = resumed.state.step  # the first step after a resume says where it came from
            row["resumed_from_checkpoint"] = str(resumed.source)
        # a rollback commits at once, so that a restart resumes past the skipped samples too
        rolled_back = faults.judge(row, before, state) and faults.rollback(run_dir, rank, row, state)
        drill.at("step", state.step)
        last = state.step == cfg.train.max_steps
        if _evaluation_due(cfg, state.step, last, rung):
            plateau = _evaluate(session, row, state.step, rung, plateau)
        if cfg.tune.trial_of and not all(math.isfinite(row.get(key) or 0.0) for key in ("loss", "val_loss")):
            end_diverged(row, progress)  # losses are the same on every rank, so every rank ends here
            break
        if progress:
            progress.record(row, force=last or "val_loss" in row)
        resizing = bool(resize and not last and resize.requested())  # a collective on every rank
        if report(cfg, session, run_dir, state, row, rank, protect, drill, rung is not None or rolled_back or resizing,
                  plateau, faults.trainer_state(), files):
            protect = None
        if stopped_at(cfg, rank, rung):
            break  # ASHA stopped this trial at this rung: it trains no step past it
        if resizing:
            resize.wait_for_resize(step)
    if progress:
        progress.close()
        files.push()
    get_logger().debug("rank %d finished", rank)


def _evaluation_due(cfg: Config, step: int, last: bool, rung: int | None) -> bool:
    """At the end, every train.eval_every steps, at a sweep rung, and in a sweep trial at every checkpoint (so that
    every report to Tune carries the metric)."""
    every = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
    return last or every or rung is not None or bool(cfg.tune.trial_of and checkpoint_due(cfg, step))


def _evaluate(session, row: dict, step: int, rung: int | None, plateau: PlateauState) -> PlateauState:
    """Validation loss into the row (with the sample count and the rung it marks); the plateau schedule's update."""
    row["val_loss"] = session.evaluate()
    row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
    row["val_samples"] = session.eval_micro_batches * session.cfg.parallel.micro_batch * session.cfg.parallel.dp
    if rung is not None:
        row["rung_tokens"] = rung
    return plateau_after_eval(plateau, row["val_loss"], step, session.cfg.schedule.lr)


def stopped_at(cfg: Config, rank: int, rung: int | None) -> bool:
    """After a rung report in an ASHA sweep: whether ASHA stopped this trial there (every rank waits for the
    decision together, raylm.tune.rung_decisions)."""
    return rung is not None and waits_for_decisions(cfg) and stopped_at_rung(cfg, rank, rung)


def report_resumed_rung(cfg: Config, session, state: TrainState) -> int | None:
    """A trial resumed from the checkpoint of a rung step reports that rung again (returned): the attempt that wrote
    it may have been interrupted before ASHA decided, and ASHA judges a trial once per rung (a rung it decided
    before goes on)."""
    import ray.train

    step_tokens = batch_size_at(state.tokens, cfg.train.global_batch, cfg.schedule.batch) * cfg.data.seq_len
    rung = next((m for m in cfg.tune.rung_tokens if state.tokens - step_tokens < m <= state.tokens), None)
    if rung is not None:
        ray.train.report({"step": state.step - 1, "tokens": state.tokens, "samples": state.samples,
                          "val_loss": session.evaluate(), "rung_tokens": rung, "resumed_rung": True})
    return rung


def end_diverged(row: dict, progress) -> None:
    """A sweep trial whose loss is not finite stops at once: one `diverged` row (no NaN in JSON), one report."""
    import ray.train

    row.update(diverged=True, **{key: None for key in ("loss", "val_loss", "val_ppl") if key in row})
    if progress:
        progress.writer.write(row)
        get_logger().warning("step %d: the loss is not finite; this trial ends as diverged", row["step"] + 1)
    ray.train.report({**row, "val_loss": DIVERGED_LOSS})


DIVERGED_LOSS = float("inf")  # what Tune sees for a diverged trial: worse than any loss (raylm's files say null)


def report(cfg: Config, session, run_dir: Location, state: TrainState, row: dict, rank: int,
           protect: Location | None, drill: FaultDrill, commit_now: bool = False,
           plateau: PlateauState = PlateauState(), extra: dict | None = None, files: RunFiles | None = None) -> bool:
    """Commit a checkpoint when one is due, or now (a sweep rung, a rollback, a resize): returns whether it did,
    with `extra` in its trainer state; then tell Ray. A report costs a controller round trip (~2 s by default): at
    checkpoints, evaluations and every train.report_every steps (docs/ray-facts.md 2). Rank 0 copies the run's
    files to object storage before each report."""
    import ray.train

    if checkpoint_due(cfg, state.step) or commit_now:
        committed = save(cfg, session.engine, run_dir, state, rank, protect,  # a collective: every rank saves
                         on_phase=lambda phase: drill.at(phase, state.step), plateau=plateau, extra=extra)
        if rank == 0 and files:
            files.push()
        report_with_checkpoint(row, committed if rank == 0 else None)
        return True
    if "val_loss" in row or state.step % cfg.train.report_every == 0:
        if rank == 0 and files:
            files.push()
        ray.train.report(row)
    return False
