"""The run folder <run.dir>/<run.name>: refuse to clobber a used name, check storage is writable, save config."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import yaml

from raylm.config import Config, to_dict
from raylm.errors import RaylmError
from raylm.log import get_logger

RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's list of reported checkpoints


def run_path(cfg: Config) -> Path:
    """Absolute path of this run's folder (Ray workers may run elsewhere, so never relative).

    run.dir is resolved, the run's own folder is not: a run folder that is a symbolic link stays the link, so
    nothing is ever deleted through it (see remove_folder)."""
    return Path(cfg.run.dir).expanduser().resolve() / cfg.run.name


def remove_folder(path: Path, what: str) -> None:
    """Delete a run or sweep folder that --overwrite replaces, but never through a symbolic link.

    The user named <run.dir>/<name>; a link there points somewhere they did not name, so raylm refuses."""
    if path.is_symlink():
        raise RaylmError(f"{what} {path} is a symbolic link to {os.path.realpath(path)}; --overwrite never deletes "
                         f"through a link: remove the link yourself, or set run.dir to the folder it points to")
    if path.exists():
        shutil.rmtree(path)


def has_run_outputs(path: Path) -> bool:
    """A folder that already holds a run's results (metrics or checkpoints), not merely an empty folder."""
    return (path / "metrics.jsonl").exists() or checkpoint_root(path).exists()


def checkpoint_root(run_dir: Path) -> Path:
    """Where a run's committed checkpoints live: <run>/checkpoints/step-XXXXXXXX."""
    return run_dir / "checkpoints"


def prepare_run_dir(cfg: Config, overwrite: bool, allow_config_change: bool = False) -> Path:
    """Create the run folder, or keep it to resume; fail early if storage is read-only.

    checkpoint.resume decides what an existing folder means: `auto` resumes it when it holds a committed
    checkpoint and starts it again when it holds none but was written by this same config (a rerun of a command
    stopped before its first commit), `never` refuses it, `required` fails without one. --overwrite replaces it. A resume whose
    seed, data, tokenizer or model shape differs from the checkpoint's is refused unless allow_config_change."""
    path = run_path(cfg)
    policy = cfg.checkpoint.resume
    if policy == "required" and (overwrite or not _has_committed(path)):
        raise RaylmError(f"checkpoint.resume=required but {checkpoint_root(path)} holds no committed checkpoint"
                         + (" (and --overwrite would delete it)" if overwrite else "")
                         + "; train without resume first or set checkpoint.resume=auto")
    if has_run_outputs(path) and not overwrite and not (policy != "never" and _has_committed(path)):
        if policy != "never" and _same_config(cfg, path):  # the same command, stopped before its first commit
            get_logger().info("run folder %s holds no committed checkpoint yet; starting it again from step 0", path)
            return _start(cfg, path)
        reason = ("checkpoint.resume=never" if policy == "never"
                  else "no committed checkpoint to resume, and another config.yaml")
        raise RaylmError(f"run folder {path} already holds a run named {cfg.run.name!r} ({reason}); pass "
                         f"--overwrite to replace it or choose another run.name=...")
    if overwrite:
        remove_folder(path, "run folder")
    elif policy != "never" and not allow_config_change:
        _check_drift(cfg, path)
    return _start(cfg, path)


def _start(cfg: Config, path: Path) -> Path:
    _check_writable(cfg, path)
    _forget_ray_snapshot(path)
    write_atomic(path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _same_config(cfg: Config, path: Path) -> bool:
    """Whether the folder's config.yaml is this run's config: a rerun of the same command (its metrics rows of
    the attempt that never committed are dropped when the new attempt starts; see raylm.train.metrics)."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return saved == yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _forget_ray_snapshot(path: Path) -> None:
    """Drop Ray Train's record of the checkpoints an earlier attempt reported.

    raylm picks the checkpoint to resume from its own commit protocol, and prunes old ones itself; Ray Train
    would otherwise refuse to start in a folder whose snapshot names a checkpoint that was pruned."""
    (path / RAY_CHECKPOINT_SNAPSHOT).unlink(missing_ok=True)


def _check_drift(cfg: Config, path: Path) -> None:
    """Refuse to resume with settings that change the data or the model, compared with the newest committed
    checkpoint whose config verifies (a damaged one is skipped here as resume=auto skips it)."""
    from raylm.checkpoint.commit import list_committed
    from raylm.checkpoint.manifest import verify_checkpoint
    from raylm.checkpoint.names import CONFIG_FILE
    from raylm.errors import CheckpointError
    from raylm.train.drift import check_resume_drift

    for folder in list_committed(checkpoint_root(path)):
        try:
            verify_checkpoint(folder, only=[CONFIG_FILE])
        except CheckpointError:
            continue
        check_resume_drift(cfg, folder)
        return


def _has_committed(path: Path) -> bool:
    from raylm.checkpoint.commit import list_committed

    return bool(list_committed(checkpoint_root(path)))


def _check_writable(cfg: Config, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RaylmError(f"run.dir {cfg.run.dir!r} is not writable ({exc.strerror}); point run.dir at a writable "
                         f"folder (shared storage on a cluster)") from None


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)
