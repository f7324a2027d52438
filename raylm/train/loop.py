"""The training loop of one rank, as an object: schedules, steps, evaluation, metrics, checkpoints, reports.

It runs wherever torch.distributed is up: in a Ray Train worker (raylm.train.worker, with RayTrainReporter)
or in plain processes (PlainReporter). Ray reaches it only through its Reporter, its sweep hooks and, in an
elastic run, the resize handshake.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import Any

from raylm.config import Config
from raylm.config.derived import micro_batches_for
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.storage.location import Location
from raylm.train.checkpointing import CheckpointManager, ResumeInfo
from raylm.train.faults import FaultDrill
from raylm.train.profiling import StepProfiler
from raylm.train.progress import Progress
from raylm.train.rank_watch import RankWatch
from raylm.train.reporter import Reporter
from raylm.train.run_records import RunFiles
from raylm.train.schedule import (
    PlateauState,
    batch_size_at,
    lr_at,
    milestone_crossed,
    plateau_after_eval,
    seq_len_at,
)
from raylm.train.startup import StartupMarks
from raylm.train.step import TimedIterator, TrainState, train_step
from raylm.train.step_faults import StepFaults
from raylm.train.trial_hooks import sweep_hooks


class Trainer:
    """One rank's run, shaped like torchtitan's Trainer: the loop owns the position (TrainState) and the
    plateau schedule; a CheckpointManager saves and loads them with the engine and the fault history
    (StepFaults), each a part with state_dict(); results go to a Reporter; a sweep trial's rungs and
    divergence go to its hooks.

    The last step always commits a checkpoint: it holds the final weights that generate and export read.
    Rank 0 writes the metrics in a local folder (the run folder, or for a run on object storage this
    machine's folder for its prefix, copied there at every report and at the end). In an elastic run a step
    after which Ray wants to resize the group commits one too, and then waits for the resize
    (raylm.train.elastic)."""

    def __init__(
        self,
        cfg: Config,
        session,
        run_dir: Location,
        rank: int,
        reporter: Reporter,
        resize=None,
        startup: StartupMarks | None = None,
    ):
        self.cfg, self.session, self.run_dir, self.rank = cfg, session, run_dir, rank
        self.reporter, self.resize = reporter, resize
        self.startup = startup  # rank 0's start-up marks, written at the first step
        self.sweep = sweep_hooks(cfg, rank, reporter)
        self.files = RunFiles(run_dir, cfg.data.cache_dir)
        self.faults = StepFaults(cfg, session.engine)
        self.checkpointer = CheckpointManager(
            cfg, session.engine, run_dir, rank, parts=[self, self.faults], nodes=_nodes()
        )
        self.state = TrainState()
        self.plateau = PlateauState()
        self.progress: Progress | None = None
        self.watch = RankWatch(cfg, session.engine, self.files.local, rank)  # stragglers and hangs

    def state_dict(self) -> dict[str, Any]:
        """The loop's part of a checkpoint's trainer state: position, layout, plateau schedule."""
        layout = self.session.engine.layout
        return {**self.state.state_dict(), "layout": layout, "plateau": asdict(self.plateau)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = TrainState.from_state_dict(saved) if saved else TrainState()
        self.plateau = PlateauState(**saved["plateau"]) if saved.get("plateau") else PlateauState()

    def train(self) -> None:
        """Resume (or start), train to train.max_steps or until a sweep ends the trial, close the metrics."""
        resumed = self.checkpointer.load()
        if self.rank == 0:
            self.files.start()
        drill = FaultDrill(self.cfg, self.files.local, self.rank)
        stall = drill.read_stall_s(self.state.step)
        session = self.session
        batches = None
        if session.reads_data:
            batches = TimedIterator(session.train_batches(self.state.samples, stall))
        if self.rank == 0:
            self.progress = Progress(self.cfg, self.files.local, start_step=self.state.step)
        # ASHA may stop a trial at the rung it resumed from
        stopped = resumed.source is not None and self.sweep.stopped_on_resume(session, self.state)
        profiler = StepProfiler(self.cfg.train.profile_steps, self.files, self.rank)
        with self.watch.running(self.state.step):
            for step in range(self.state.step, self.state.step if stopped else self.cfg.train.max_steps):
                with profiler.around(step):  # train.profile_steps
                    row, before, rung = self.train_step(step, batches, drill)
                if self.startup is not None:
                    self.startup.first_step_done(row, self.files)
                    self.startup = None
                if not self.after_step(step, row, before, rung, resumed, drill):
                    break
        self.checkpointer.wait()  # a background save still in flight (a loop that ended early)
        self.checkpointer.close()
        if self.progress:
            self.progress.close()
            self.files.push()
        get_logger().debug("rank %d finished", self.rank)

    def train_step(self, step: int, batches: TimedIterator | None, drill: FaultDrill):
        """One optimizer step at the step's batch size, window length and lr: its metrics row, the state before
        it, and the sweep rung it crossed (None if none). A shorter window trains the same samples' tokens
        (schedule.seq_len), so tokens per step do not depend on it."""
        cfg = self.cfg
        global_batch = batch_size_at(self.state.tokens, cfg.train.global_batch, cfg.schedule.batch)
        seq_len = seq_len_at(step, cfg.data.seq_len, cfg.schedule.seq_len)
        lr = lr_at(step, cfg.optim.lr, cfg.train.max_steps, cfg.schedule.lr, self.plateau.scale)
        lr *= drill.lr_factor(step)
        drill.poison(self.session.engine, step)
        micro_batches = micro_batches_for(global_batch, cfg)
        result = train_step(self.session.engine, batches, micro_batches, lr, seq_len)
        tokens_after = self.state.tokens + global_batch * cfg.data.seq_len
        rung = milestone_crossed(self.state.tokens, tokens_after, cfg.tune.rung_tokens)
        self.state, before = self.state.advance(global_batch, cfg.data.seq_len), self.state
        return self.session.metrics_row(self.state, result, lr, global_batch, seq_len), before, rung

    def after_step(
        self,
        step: int,
        row: dict,
        before: TrainState,
        rung: int | None,
        resumed: ResumeInfo,
        drill: FaultDrill,
    ) -> bool:
        """Judge, evaluate, record, checkpoint and report the step; False when the loop ends here."""
        self.watch.step_ended(self.state.step, row)  # a collective every train.report_every steps
        if resumed.source and step == resumed.state.step:
            row["resumed_from"] = resumed.state.step  # the first step after a resume says where it came from
            row["resumed_from_checkpoint"] = str(resumed.source)
        # a background save every rank has finished commits now (its times go into this row)
        finished = self.checkpointer.poll(row)
        # a rollback commits at once, so that a restart resumes past the skipped samples too
        judged = self.judge(row, before)
        if judged:  # roll back to the newest checkpoint: the one in flight, if any
            finished = self.checkpointer.wait() or finished
        rolled_back = judged and self.faults.rollback(self.run_dir, self.rank, row, self.state)
        drill.at("step", self.state.step)
        last = self.state.step == self.cfg.train.max_steps
        self.checkpointer.observe_step(row["step_s"])
        if _evaluation_due(self.cfg, self.state.step, last, rung, self.checkpointer.due(self.state.step)):
            self.plateau = _evaluate(self.session, row, self.state.step, rung, self.plateau)
        if self.sweep.diverged(row):
            # losses are the same on every rank: every rank ends here
            self.sweep.end_diverged(row, self.progress)
            return False
        if self.progress:
            self.progress.record(row, force=last or "val_loss" in row or "ckpt_step" in row)
        resizing = bool(self.resize and not last and self.resize.requested())  # a collective on every rank
        self.sweep.before_report(rung)
        commit_now = rung is not None or rolled_back or resizing
        self.checkpoint_and_report(row, drill, commit_now, finished)
        if self.sweep.stopped_at(rung):
            return False  # ASHA stopped this trial at this rung: it trains no step past it
        if resizing:
            self.resize.wait_for_resize(step)
        return True

    def judge(self, row: dict, before: TrainState) -> bool:
        """StepFaults' verdict on the step (True: roll back). Under fault.nonfinite=stop, raised on every rank
        alike, a background save in flight is finished first: it holds the state from before the bad step."""
        try:
            return self.faults.judge(row, before, self.state)
        except RaylmError:
            self.checkpointer.wait()
            raise

    def checkpoint_and_report(
        self, row: dict, drill: FaultDrill, commit_now: bool = False, finished: Location | None = None
    ) -> bool:
        """Save a checkpoint when one is due (in the background under checkpoint.async), or commit one now (a
        sweep rung, a rollback, a resize, the last step), and report the newest committed (`finished`: one a
        background save committed this step); else report at evaluations and every train.report_every steps
        (a report to Ray costs a controller round trip, ~2 s by default). Rank 0 copies the run's files to
        object storage before each report. Returns whether it reported a commit."""
        step = self.state.step
        committed = finished
        if self.checkpointer.due(step) or commit_now:
            if self.rank == 0:
                # the rows this checkpoint covers reach the run's storage before it commits: a run resumed from
                # it after losing every node finds them there
                self.files.push()
            # a collective: every rank saves; a sweep trial's reports to Tune each carry a checkpoint and the
            # evaluation taken with it, so its saves finish in the step
            wait = commit_now or step == self.cfg.train.max_steps or bool(self.cfg.tune.trial_of)
            committed = (
                self.checkpointer.save(on_phase=lambda phase: drill.at(phase, step), wait=wait) or committed
            )
        if committed is not None:
            if self.rank == 0:
                self.files.push()  # whatever the save added; a no-op when nothing changed
            self.reporter.report_checkpoint(row, committed if self.rank == 0 else None)
            return True
        if "val_loss" in row or step % self.cfg.train.report_every == 0:
            if self.rank == 0:
                self.files.push()
            self.reporter.report(row)
        return False


def _evaluation_due(cfg: Config, step: int, last: bool, rung: int | None, checkpoint_due: bool) -> bool:
    """At the end, every train.eval_every steps, at a sweep rung, and in a sweep trial at every checkpoint (so
    that every report to Tune carries the metric)."""
    every = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
    return last or every or rung is not None or bool(cfg.tune.trial_of and checkpoint_due)


def _nodes() -> int:
    """Nodes the worker group spans: the world over the workers on this node (launchers set both)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, world // max(1, local))


def _evaluate(session, row: dict, step: int, rung: int | None, plateau: PlateauState) -> PlateauState:
    """Validation loss into the row (with the sample count and the rung it marks); the plateau schedule's
    update."""
    parallel = session.cfg.parallel
    row["val_loss"] = session.evaluate()
    row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
    row["val_samples"] = session.eval_micro_batches * parallel.micro_batch * parallel.dp
    if rung is not None:
        row["rung_tokens"] = rung
    return plateau_after_eval(plateau, row["val_loss"], step, session.cfg.schedule.lr)
