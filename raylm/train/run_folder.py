"""The run folder <run.dir>/<run.name> (or prefix, on object storage): refuse to clobber a used name, check storage
is writable, save config."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import overload

import yaml

from raylm.checkpoint.commit import list_committed
from raylm.checkpoint.manifest import verify_checkpoint
from raylm.config import Config, to_dict
from raylm.errors import CheckpointError, RaylmError
from raylm.log import get_logger
from raylm.storage.file_names import CONFIG_FILE, METRICS_FILE
from raylm.storage.location import (
    Location,
    delete_files,
    file_sizes,
    is_remote,
    local_view,
    read_bytes,
    remove_empty_folders,
    write_text,
)
from raylm.storage.uri import StorageUri, is_uri, parse_uri
from raylm.train.drift import check_resume_drift

RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's list of reported checkpoints
# Every object name raylm (or Ray Train, for raylm) writes under a run prefix: --overwrite deletes these and no other.
RUN_OBJECTS = re.compile(
    r"^(metrics\.jsonl|config\.yaml|loss\.png|\.fault-drill-fired|\.validate_storage_marker|"
    rf"{RAY_CHECKPOINT_SNAPSHOT.replace('.', '[.]')}|"
    r"tensorboard/events\.out\.tfevents\.[\w.-]+|placement/rank-\d+\.json|trackers/(mlflow|wandb)\.json|"
    r"profile/rank-\d+\.(json\.gz|top\.txt)|"
    r"checkpoints/step-\d{8,}/(manifest\.json|config\.yaml|trainer_state\.json|engine\.json|"
    r"tokenizer\.json|(model|optim)/\d{3}-[\w.]+\.pt|ranks/rank-\d{5,}\.pt))$"
)


def run_path(cfg: Config) -> Location:
    """Where this run lives: an absolute folder (Ray workers may run elsewhere, so never relative), or the
    prefix <run.dir>/<run.name> when run.dir is an s3:// or gs:// URI.

    run.dir is resolved, the run's own folder is not: a run folder that is a symbolic link stays the link, so
    nothing is ever deleted through it (see remove_folder)."""
    if is_uri(cfg.run.dir):
        return parse_uri(cfg.run.dir, "run.dir") / cfg.run.name
    return Path(cfg.run.dir).expanduser().resolve() / cfg.run.name


def remove_folder(path: Location, what: str) -> None:
    """Delete a run or sweep folder that --overwrite replaces, but never through a symbolic link.

    The user named <run.dir>/<name>; a link there points somewhere they did not name, so raylm refuses. On
    object storage only the objects of raylm's own names directly under that exact prefix are deleted."""
    if is_remote(path):
        _remove_run_objects(path)
        return
    if path.is_symlink():
        raise RaylmError(
            f"{what} {path} is a symbolic link to {os.path.realpath(path)}; --overwrite never deletes "
            f"through a link: remove the link yourself, or set run.dir to the folder it points to"
        )
    if path.exists():
        shutil.rmtree(path)


def _remove_run_objects(prefix: Location) -> None:
    """--overwrite on object storage: checkpoints first (each manifest before its files), then the run's other
    objects; anything under the prefix that raylm did not name is left in place and listed in a warning."""
    names = file_sizes(prefix)
    ours = sorted(
        (n for n in names if RUN_OBJECTS.match(n)), key=lambda n: (not n.endswith("/manifest.json"), n)
    )
    delete_files(prefix, ours)
    remove_empty_folders(prefix, ("checkpoints", "tensorboard", "placement"))
    foreign = sorted(set(names) - set(ours))
    if foreign:
        get_logger().warning(
            "--overwrite left %d object(s) under %s that raylm did not write: %s",
            len(foreign),
            prefix,
            ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else ""),
        )


def has_run_outputs(path: Location) -> bool:
    """A folder that already holds a run's results (metrics or checkpoints), not merely an empty folder."""
    if is_remote(path):
        names = file_sizes(path)
        return METRICS_FILE in names or any(n.startswith("checkpoints/") for n in names)
    return (path / METRICS_FILE).exists() or checkpoint_root(path).exists()


@overload
def checkpoint_root(run_dir: Path) -> Path: ...


@overload
def checkpoint_root(run_dir: StorageUri) -> StorageUri: ...


@overload
def checkpoint_root(run_dir: Location) -> Location: ...


def checkpoint_root(run_dir: Location) -> Location:
    """Where a run's committed checkpoints live: <run>/checkpoints/step-XXXXXXXX."""
    return run_dir / "checkpoints"


def prepare_run_dir(cfg: Config, overwrite: bool, allow_config_change: bool = False) -> Location:
    """Create the run folder, or keep it to resume; fail early if storage is read-only.

    checkpoint.resume decides what an existing folder means: `auto` resumes it when it holds a committed
    checkpoint and starts it again when it holds none but was written by this same config (a rerun of a command
    stopped before its first commit), `never` refuses it, `required` fails without one. --overwrite replaces it.
    A resume whose seed, data, tokenizer or model shape differs from the checkpoint's is refused unless
    allow_config_change."""
    path = run_path(cfg)
    policy = cfg.checkpoint.resume
    if policy == "required" and (overwrite or not _has_committed(path)):
        raise RaylmError(
            f"checkpoint.resume=required but {checkpoint_root(path)} holds no committed checkpoint"
            + (" (and --overwrite would delete it)" if overwrite else "")
            + "; train without resume first or set checkpoint.resume=auto"
        )
    if has_run_outputs(path) and not overwrite and not (policy != "never" and _has_committed(path)):
        if policy != "never" and _same_config(cfg, path):  # the same command, stopped before its first commit
            get_logger().info(
                "run folder %s holds no committed checkpoint yet; starting it again from step 0", path
            )
            return _start(cfg, path)
        reason = (
            "checkpoint.resume=never"
            if policy == "never"
            else "no committed checkpoint to resume, and another config.yaml"
        )
        raise RaylmError(
            f"run folder {path} already holds a run named {cfg.run.name!r} ({reason}); pass "
            f"--overwrite to replace it or choose another run.name=..."
        )
    if overwrite:
        remove_folder(path, "run folder")
    elif policy != "never" and not allow_config_change:
        _check_drift(cfg, path)
    return _start(cfg, path)


def _start(cfg: Config, path: Location) -> Location:
    _check_writable(cfg, path)
    _forget_ray_snapshot(path)
    write_text(path / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _same_config(cfg: Config, path: Location) -> bool:
    """Whether the folder's config.yaml is this run's config: a rerun of the same command (its metrics rows of
    the attempt that never committed are dropped when the new attempt starts; see raylm.train.metrics)."""
    try:
        saved = yaml.safe_load(read_bytes(path / CONFIG_FILE) or b"")
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return saved == yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _forget_ray_snapshot(path: Location) -> None:
    """Drop Ray Train's record of the checkpoints an earlier attempt reported.

    raylm picks the checkpoint to resume from its own commit protocol, and prunes old ones itself; Ray Train
    would otherwise refuse to start in a folder whose snapshot names a checkpoint that was pruned."""
    delete_files(path, [RAY_CHECKPOINT_SNAPSHOT])


def _check_drift(cfg: Config, path: Location) -> None:
    """Refuse to resume with settings that change the data or the model, compared with the newest committed
    checkpoint whose config verifies (a damaged one is skipped here as resume=auto skips it)."""
    for folder in list_committed(checkpoint_root(path)):
        try:
            verify_checkpoint(folder, only=[CONFIG_FILE], cache_dir=cfg.data.cache_dir)
        except CheckpointError:
            continue
        check_resume_drift(cfg, folder)
        return


def _has_committed(path: Location) -> bool:
    return bool(list_committed(checkpoint_root(path)))


def _check_writable(cfg: Config, path: Location) -> None:
    """Write and delete a probe file (object) now, so a read-only folder or a bucket that refuses writes fails
    before any worker starts; the node-local folder of a run on object storage must be writable too."""
    probe = f".write-probe-{uuid.uuid4().hex}"
    try:
        local = local_view(path, cfg.data.cache_dir)
        local.mkdir(parents=True, exist_ok=True)
        write_text(path / probe, "ok")
        if is_remote(path) and read_bytes(path / probe) != b"ok":
            raise RaylmError(
                f"run.dir {cfg.run.dir!r}: a probe object written to {path} did not read back; "
                f"check the storage endpoint"
            )
        delete_files(path, [probe])
    except OSError as exc:
        raise RaylmError(
            f"run.dir {cfg.run.dir!r} is not writable ({exc.strerror or exc}); point run.dir at a "
            f"writable folder or bucket (shared storage on a cluster)"
        ) from None
