"""Training-side checkpoints: when to save, the trainer state that goes in, resuming a rank, reporting to Ray."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raylm.config import Config
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.train.rundir import checkpoint_root
from raylm.train.schedule import PlateauState
from raylm.train.step import TrainState


@dataclass(frozen=True)
class ResumeInfo:
    """Where a (re)started worker group begins, and the checkpoint it came from (never pruned by this attempt)."""

    state: TrainState
    source: Path | None = None
    plateau: PlateauState | None = None  # the plateau lr schedule's state at that checkpoint


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Save every checkpoint.every_steps steps and always at the last step."""
    every = cfg.checkpoint.every_steps
    return step == cfg.train.max_steps or bool(every and step % every == 0)


def resume_point(cfg: Config, run_dir: Path, rank: int) -> Path | None:
    """The committed checkpoint every rank resumes from (chosen and verified on rank 0, then broadcast).

    Runs on every (re)start of the worker group: after a lost worker, Ray Train restarts the group and this
    finds the newest committed checkpoint the failed attempt wrote, whatever checkpoint.resume says; the driver
    has already refused a run folder that the policy does not allow resuming."""
    import torch.distributed as dist

    from raylm.checkpoint.commit import pick_resume

    choice: list[Any] = [None]
    if rank == 0:
        policy = "required" if cfg.checkpoint.resume == "required" else "auto"
        try:
            picked = pick_resume(checkpoint_root(run_dir), policy)
            if picked is None and cfg.tune.start_from:  # a PBT exploit: the donor's checkpoint, copied
                picked = pick_resume(cfg.tune.start_from, "required")
            choice = [str(picked) if picked else None]
        except RaylmError as exc:  # every rank must leave the broadcast, then fail with the same line
            choice = [exc]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], RaylmError):
        raise choice[0]
    return Path(choice[0]) if choice[0] else None


def restore(engine, path: Path) -> ResumeInfo:
    """Load model and optimizer state (resharded to this layout if it changed) and, same layout, this rank's RNG."""
    from raylm.checkpoint.rng import restore_rng
    from raylm.checkpoint.state import load_checkpoint

    resumed = load_checkpoint(engine, path)
    if resumed.rank_state is not None:
        restore_rng(resumed.rank_state["rng"])
    saved = resumed.trainer_state
    state = TrainState(step=saved["step"], tokens=saved["tokens"], samples=saved["samples"])
    layout = saved.get("layout")
    now = {"pp": engine.topo.pp, "tp": engine.topo.tp, "dp": engine.topo.dp}
    if layout and layout != now:
        get_logger().info("checkpoint %s was written with %s; resharding model and optimizer state to %s",
                             path.name, _layout_text(layout), _layout_text(now))
    get_logger().info("resumed from %s at step %d (%d tokens, sample %d)", path, state.step, state.tokens,
                      state.samples)
    plateau = PlateauState(**saved["plateau"]) if saved.get("plateau") else None
    return ResumeInfo(state=state, source=path, plateau=plateau)


def save(cfg: Config, engine, run_dir: Path, state: TrainState, rank: int, protect: Path | None,
         on_phase=None, plateau: PlateauState | None = None) -> Path:
    """Commit a checkpoint (a collective over every rank), then prune old ones on rank 0."""
    from raylm.checkpoint.commit import prune
    from raylm.checkpoint.rng import capture_rng
    from raylm.checkpoint.state import save_checkpoint

    trainer = {"step": state.step, "tokens": state.tokens, "samples": state.samples,
               "layout": {"pp": engine.topo.pp, "tp": engine.topo.tp, "dp": engine.topo.dp},
               "plateau": asdict(plateau or PlateauState())}
    path = save_checkpoint(engine, checkpoint_root(run_dir), state.step, trainer, rank_state={"rng": capture_rng()},
                           on_phase=on_phase)
    if rank == 0:
        prune(checkpoint_root(run_dir), cfg.checkpoint.keep, protect=protect)
    return path


def report_with_checkpoint(row: dict[str, Any], path: Path | None) -> None:
    """ray.train.report with the committed folder, which already sits in the run folder: nothing is copied."""
    import ray.train
    from ray.train import CheckpointUploadMode

    checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
    ray.train.report(row, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _layout_text(layout: dict) -> str:
    return f"(pp={layout['pp']}, tp={layout['tp']}, dp={layout['dp']})"
