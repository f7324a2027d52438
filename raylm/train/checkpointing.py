"""Training-side checkpoints: when to save, resuming a rank, committing one, the manager the loop holds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raylm.checkpoint.background import BackgroundSaver
from raylm.checkpoint.commit import every_checkpoint_damaged, prune, resume_candidates
from raylm.checkpoint.rng import capture_rng, restore_rng
from raylm.checkpoint.state import UnverifiedFile, load_checkpoint, save_checkpoint, verify_for_load
from raylm.config import Config
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.plan.decide import CheckpointInterval, checkpoint_interval
from raylm.storage.location import Location, as_location
from raylm.train.run_folder import checkpoint_root
from raylm.train.schedule import PlateauState
from raylm.train.step import TrainState

if TYPE_CHECKING:
    from raylm.parallel.engine import Engine


@dataclass(frozen=True)
class ResumeInfo:
    """Where a (re)started worker group begins, and the checkpoint it came from (never pruned by this attempt)."""

    state: TrainState
    source: Location | None = None
    plateau: PlateauState | None = None  # the plateau lr schedule's state at that checkpoint
    trainer: dict | None = None  # the checkpoint's whole trainer state (fault handling reads its own keys)


def resume_candidates_of(cfg: Config, run_dir: Location, rank: int) -> list[Location]:
    """The committed checkpoints to try, newest first (manifests and sizes checked on rank 0, then broadcast).

    Runs on every (re)start of the worker group: after a lost worker, Ray Train restarts the group and this
    finds the newest committed checkpoint the failed attempt wrote, whatever checkpoint.resume says; the driver
    has already refused a run folder that the policy does not allow resuming."""
    import torch.distributed as dist

    choice: list[Any] = [None]
    if rank == 0:
        policy = "required" if cfg.checkpoint.resume == "required" else "auto"
        try:
            candidates = resume_candidates(checkpoint_root(run_dir), policy)
            if not candidates and cfg.tune.start_from:  # a PBT exploit: the donor's checkpoint, copied
                candidates = resume_candidates(cfg.tune.start_from, "required")
            choice = [[str(p) for p in candidates]]
        except RaylmError as exc:  # every rank must leave the broadcast, then fail with the same line
            choice = [exc]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], RaylmError):
        raise choice[0]
    return [as_location(p) for p in choice[0]]


def resume(cfg: Config, engine: Engine, run_dir: Location, rank: int) -> ResumeInfo:
    """Load the newest checkpoint whose files verify, if any (all ranks together); the run's position either way.

    Each rank hashes only the files it reads. Under checkpoint.resume=auto a checkpoint that fails is skipped with
    a warning naming the file and the next older one is tried; under required it is an error."""
    candidates = resume_candidates_of(cfg, run_dir, rank)
    for path in candidates:
        try:
            manifest = verify_for_load(engine, cfg, path)  # every rank raises alike, so all move on together
        except UnverifiedFile as exc:  # another model is not skipped: that is an error under every policy
            if cfg.checkpoint.resume == "required":
                raise
            get_logger().warning("skipping unusable checkpoint %s: %s", path.name, exc)
            continue
        return restore(cfg, engine, path, manifest)
    if candidates:
        raise every_checkpoint_damaged(checkpoint_root(run_dir), candidates)
    return ResumeInfo(state=TrainState())


def restore(cfg: Config, engine: Engine, path: Location, manifest: dict | None = None) -> ResumeInfo:
    """Load model and optimizer state (resharded to this layout if it changed) and, same layout, this rank's RNG."""
    resumed = load_checkpoint(engine, cfg, path, manifest)
    if resumed.rank_state is not None:
        restore_rng(resumed.rank_state["rng"])
    saved = resumed.trainer_state
    state = TrainState.from_state_dict(saved)
    layout = saved.get("layout")
    if layout and layout != engine.layout:
        get_logger().info(
            "checkpoint %s was written with %s; resharding model and optimizer state to %s",
            path.name,
            _layout_text(layout),
            _layout_text(engine.layout),
        )
    get_logger().info(
        "resumed from %s at step %d (%d tokens, sample %d)", path, state.step, state.tokens, state.samples
    )
    plateau = PlateauState(**saved["plateau"]) if saved.get("plateau") else None
    return ResumeInfo(state=state, source=path, plateau=plateau, trainer=saved)


def commit(
    cfg: Config,
    engine: Engine,
    run_dir: Location,
    trainer: dict[str, Any],
    rank: int,
    protect: Location | None,
    on_phase=None,
) -> Location:
    """Commit the engine's state, this rank's RNG and the JSON-able `trainer` state (its `step` names the
    folder); then rank 0 prunes all but checkpoint.keep, never `protect`."""
    path = save_checkpoint(
        engine,
        cfg,
        checkpoint_root(run_dir),
        trainer["step"],
        trainer,
        rank_state={"rng": capture_rng()},
        on_phase=on_phase,
    )
    if rank == 0:
        prune(checkpoint_root(run_dir), cfg.checkpoint.keep, protect=protect)
    return path


class CheckpointManager:
    """One rank's checkpoints of a run, over parts that expose state_dict() / load_state_dict(saved): the
    engine (model, optimizer; this rank's RNG beside it) and the parts whose JSON-able states make up
    trainer_state.json (the loop's position and schedules, fault handling's history), merged in the order
    given. Under checkpoint.async a save runs in the background (raylm.checkpoint.background): the loop
    calls poll() every step and wait() where it needs the newest checkpoint committed."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        run_dir: Location,
        rank: int,
        parts: list | None = None,
        nodes: int = 1,
    ):
        self.cfg, self.engine, self.run_dir, self.rank = cfg, engine, run_dir, rank
        self.parts = list(parts or [])
        self.protect: Location | None = None  # the resume source: kept until this attempt commits its own
        # checkpoint.interval=auto: the interval is set once the first save of this attempt has been timed
        self.auto = cfg.checkpoint.interval == "auto"
        self.every = 0 if self.auto else cfg.checkpoint.every_steps
        self.nodes = nodes
        self.step_s = 0.0
        self.interval: CheckpointInterval | None = None
        self.background: BackgroundSaver | None = None  # made at the first background save
        self.figures: dict[str, float] = {}  # the last finished save's times, for the next metrics row

    def observe_step(self, step_s: float) -> None:
        """The last step's time (Young/Daly's interval is counted in steps)."""
        self.step_s = step_s

    def due(self, step: int) -> bool:
        """At the last step, every `every` steps, and under auto at the first step of this attempt (to time a
        save)."""
        if self.auto and self.interval is None:
            return True
        return step == self.cfg.train.max_steps or bool(self.every and step % self.every == 0)

    def load(self) -> ResumeInfo:
        """Load the newest committed checkpoint that verifies, if any (all ranks together), into the engine
        and into every part; the run's position either way."""
        resumed = resume(self.cfg, self.engine, self.run_dir, self.rank)
        self.protect = resumed.source
        for part in self.parts:
            part.load_state_dict(resumed.trainer or {})
        return resumed

    def save(self, on_phase=None, wait: bool = True) -> Location | None:
        """Save every part now (a collective over every rank); the folder committed. Under checkpoint.async
        with `wait` False the save goes on in the background (poll() reports its commit) and the folder
        returned is the previous save's, when this one had to wait for it (else None).

        A save waits for the one in flight first (at most one at a time). The first save of an auto interval
        waits to be timed whole."""
        trainer: dict[str, Any] = {}
        for part in self.parts:
            trainer.update(part.state_dict())
        timing = self.auto and self.interval is None
        if not self.cfg.checkpoint.async_save:
            start = time.perf_counter()
            path = commit(self.cfg, self.engine, self.run_dir, trainer, self.rank, self.protect, on_phase)
            self.protect = None
            save_s = round(time.perf_counter() - start, 4)
            self.figures = {"ckpt_step": trainer["step"], "ckpt_wait_s": 0.0, "ckpt_blocking_s": save_s}
            self.figures["ckpt_save_s"] = save_s
            if timing:
                self.set_interval(save_s, 0.0)
            return path
        background, previous = self._start(trainer, on_phase)
        if not (wait or timing):
            return previous
        committed = self._finish(background.wait())
        if timing:
            self.set_interval(self.figures["ckpt_blocking_s"], self.figures["ckpt_save_s"])
        return committed

    def poll(self, row: dict[str, Any]) -> Location | None:
        """Every step, every rank: the folder of a background save that every rank has now finished and rank 0
        committed, else None; the figures of the last finished save go into `row` (ckpt_step, ckpt_wait_s:
        waiting for the save before it, ckpt_blocking_s: the time the save step lost in all, ckpt_save_s: from
        its start to its commit)."""
        path = self._finish(self.background.poll() if self.background else None)
        row.update(self.figures)
        self.figures = {}
        return path

    def wait(self) -> Location | None:
        """Finish a background save in flight (every rank together): before a rollback, at the end of training."""
        return self._finish(self.background.wait() if self.background else None)

    def close(self) -> None:
        if self.background:
            self.background.close()

    def _start(self, trainer: dict[str, Any], on_phase) -> tuple[BackgroundSaver, Location | None]:
        if self.background is None:
            self.background = BackgroundSaver(self.cfg, self.engine.device)
        root, keep, protect = checkpoint_root(self.run_dir), self.cfg.checkpoint.keep, self.protect

        def after_commit(committed: Location) -> None:  # on rank 0's thread, after the manifest
            prune(root, keep, protect=protect)

        previous = self.background.start(
            self.engine,
            root,
            trainer["step"],
            trainer,
            {"rng": capture_rng()},
            on_phase or (lambda name: None),
            after_commit,
        )
        self.protect = None
        return self.background, self._finish(previous)

    def _finish(self, committed: Location | None) -> Location | None:
        """A background save just committed: its figures go into the next metrics row."""
        if committed is not None and self.background is not None:
            self.figures = dict(self.background.finished)
        return committed

    def set_interval(self, save_s: float, background_s: float) -> None:
        """Young/Daly's interval from the time a save stops the loop and the last step's, the slowest rank's of
        each (a collective: every rank takes the same interval), never shorter than a background save takes
        (at most one in flight); rank 0 logs it with the time it expects to lose."""
        import torch.distributed as dist

        figures: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(figures, (save_s, self.step_s, background_s))
        save_s = max(f[0] for f in figures)
        step_s = max(max(f[1] for f in figures), 1e-6)
        background_s = max(f[2] for f in figures)
        self.interval = checkpoint_interval(
            save_s, step_s, self.cfg.fault.mtbf_hours, self.nodes, min_interval_s=background_s
        )
        self.every = self.interval.steps
        if self.rank == 0:
            get_logger().info("checkpoint.every_steps=auto: %s", self.interval.describe())


def _layout_text(layout: dict) -> str:
    return f"(pp={layout['pp']}, tp={layout['tp']}, dp={layout['dp']})"
