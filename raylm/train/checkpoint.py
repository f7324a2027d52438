"""Training-side checkpoints: when to save, the trainer state that goes in, resuming a rank, reporting to Ray."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from raylm.checkpoint.commit import every_checkpoint_damaged, prune, resume_candidates
from raylm.checkpoint.rng import capture_rng, restore_rng
from raylm.checkpoint.state import UnverifiedFile, load_checkpoint, save_checkpoint, verify_for_load
from raylm.config import Config
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.storage.location import Location, as_location, is_remote
from raylm.train.rundir import checkpoint_root
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


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Save every checkpoint.every_steps steps and always at the last step."""
    every = cfg.checkpoint.every_steps
    return step == cfg.train.max_steps or bool(every and step % every == 0)


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
    state = TrainState(step=saved["step"], tokens=saved["tokens"], samples=saved["samples"])
    layout = saved.get("layout")
    if layout and layout != engine.layout:
        get_logger().info("checkpoint %s was written with %s; resharding model and optimizer state to %s",
                          path.name, _layout_text(layout), _layout_text(engine.layout))
    get_logger().info("resumed from %s at step %d (%d tokens, sample %d)", path, state.step, state.tokens,
                      state.samples)
    plateau = PlateauState(**saved["plateau"]) if saved.get("plateau") else None
    return ResumeInfo(state=state, source=path, plateau=plateau, trainer=saved)


def save(cfg: Config, engine: Engine, run_dir: Location, state: TrainState, rank: int, protect: Location | None,
         on_phase=None, plateau: PlateauState | None = None, extra: dict | None = None) -> Location:
    """Commit a checkpoint (a collective over every rank), then prune old ones on rank 0; `extra` adds JSON-able
    keys to the trainer state."""
    trainer = {"step": state.step, "tokens": state.tokens, "samples": state.samples, "layout": engine.layout,
               "plateau": asdict(plateau or PlateauState()), **(extra or {})}
    path = save_checkpoint(engine, cfg, checkpoint_root(run_dir), state.step, trainer,
                           rank_state={"rng": capture_rng()}, on_phase=on_phase)
    if rank == 0:
        prune(checkpoint_root(run_dir), cfg.checkpoint.keep, protect=protect)
    return path


def report_with_checkpoint(row: dict[str, Any], path: Location | None) -> None:
    """ray.train.report with the committed folder, which already sits in the run folder (or prefix, on Ray
    Train's own storage filesystem): nothing is copied."""
    import ray.train
    from ray.train import CheckpointUploadMode

    checkpoint = None
    if path is not None and is_remote(path):
        storage = ray.train.get_context().get_storage()  # the filesystem RunConfig was given
        checkpoint = ray.train.Checkpoint(path=path.path, filesystem=storage.storage_filesystem)
    elif path is not None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path))
    ray.train.report(row, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _layout_text(layout: dict) -> str:
    return f"(pp={layout['pp']}, tp={layout['tp']}, dp={layout['dp']})"
