"""The commit protocol of <run>/checkpoints/: write under tmp-*, manifest last, rename to step-XXXXXXXX; pick and prune.

Only a step-XXXXXXXX folder with a readable manifest.json counts as committed; a crash at any point leaves
either a tmp-* folder (never counted, removed by `prune`) or a complete checkpoint. DeepSpeed's `latest` file
is not used: the newest committed folder is found by listing.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from raylm.checkpoint.manifest import read_manifest, write_manifest
from raylm.errors import CheckpointError, ConfigError
from raylm.fsync import fsync_path
from raylm.log import get_logger

STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = "tmp-"
RESUME_POLICIES = ("auto", "required", "never")


def step_dir_name(step: int) -> str:
    """The committed folder name of a step: step-00000200 (zero-padded so names sort like steps)."""
    return f"step-{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step a step-XXXXXXXX folder name encodes, else None."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def new_tmp_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Create <dir>/tmp-step-XXXXXXXX-<nonce>/, the folder a save writes into before its commit."""
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, files: dict[str, dict], extra: dict) -> Path:
    """Write the manifest into `tmp` (after every file is complete) and rename it to step-XXXXXXXX.

    A committed folder of the same step (a run that resumed from an older one) is replaced: it is first
    renamed to a tmp-* name, so no half-replaced folder is ever counted.
    """
    write_manifest(tmp, step, files, extra)
    final = tmp.parent / step_dir_name(step)
    replaced = None
    if final.exists():
        replaced = tmp.parent / f"{TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:12]}"
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_path(tmp.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Every step-XXXXXXXX folder, newest step first, committed or not (see list_committed)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of, reverse=True)


def is_committed(folder: Path) -> bool:
    """A step folder whose manifest.json exists and parses (file hashes are checked by verify_checkpoint)."""
    try:
        read_manifest(folder)
    except CheckpointError:
        return False
    return True


def list_committed(checkpoints_dir: str | Path) -> list[Path]:
    """Committed checkpoints, newest step first; tmp-* folders and step folders without a manifest never count."""
    return [p for p in list_checkpoints(checkpoints_dir) if is_committed(p)]


def check_sizes(folder: Path) -> dict:
    """The manifest, once every file it lists exists with its listed size: the cheap check, no file is read.

    The sha256 of each file is checked at load by the ranks that read it (raylm.checkpoint.state)."""
    manifest = read_manifest(folder)
    fix = f"delete {folder} so that an older checkpoint is used"
    for rel_path, record in manifest["files"].items():
        path = folder / rel_path
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; {fix}")
        if path.stat().st_size != record["bytes"]:
            raise CheckpointError(f"checkpoint file {path} has {path.stat().st_size} bytes but the manifest lists "
                                  f"{record['bytes']} (truncated or overwritten); {fix}")
    return manifest


def resume_candidates(checkpoints_dir: str | Path, policy: str) -> list[Path]:
    """The checkpoints to try resuming from under `policy` (checkpoint.resume), newest first; [] = start fresh.

    Only manifests and file sizes are checked here; the loading ranks check the hashes (and under auto fall back
    to the next candidate when one fails).
    auto: every checkpoint whose manifest and sizes check; a bad one is skipped with a warning naming the file;
    when every one is bad, CheckpointError naming them (starting over would lose the run's place, and pruning
    would then delete them).
    required: the newest checkpoint, which must check; CheckpointError naming the bad file, or saying none exists.
    never: [].
    """
    if policy not in RESUME_POLICIES:
        raise ConfigError(f"checkpoint.resume={policy!r} is not one of {'|'.join(RESUME_POLICIES)}; "
                          f"set checkpoint.resume=auto")
    if policy == "never":
        return []
    candidates = list_checkpoints(checkpoints_dir)
    if policy == "required":
        if not candidates:
            raise CheckpointError(f"checkpoint.resume=required but {checkpoints_dir} holds no committed checkpoint; "
                                  f"point run.dir/run.name at the run to resume, or set checkpoint.resume=auto")
        check_sizes(candidates[0])
        return candidates[:1]
    usable = []
    for folder in candidates:
        try:
            check_sizes(folder)
            usable.append(folder)
        except CheckpointError as exc:
            get_logger().warning("skipping unusable checkpoint %s: %s", folder.name, exc)
    if candidates and not usable:
        raise every_checkpoint_damaged(checkpoints_dir, candidates)
    return usable


def every_checkpoint_damaged(checkpoints_dir: str | Path, folders: list[Path]) -> CheckpointError:
    """The error for a run whose checkpoints all fail their checks: nothing is deleted, the user decides."""
    names = ", ".join(folder.name for folder in folders)
    return CheckpointError(f"every checkpoint in {checkpoints_dir} is damaged ({names}; the warnings above name "
                           f"each bad file) and nothing was deleted: restore them from a copy, or start over with "
                           f"--overwrite or another run.name")


def pick_resume(checkpoints_dir: str | Path, policy: str) -> Path | None:
    """The newest of resume_candidates (manifest and sizes checked, not hashes), or None to start fresh."""
    candidates = resume_candidates(checkpoints_dir, policy)
    return candidates[0] if candidates else None


def prune(checkpoints_dir: str | Path, keep: int, protect: str | Path | None = None) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep`, and every stale tmp-* folder; returns what went.

    `protect` (the checkpoint this run resumed from) is never deleted, even when newer but corrupt folders
    outnumber `keep`. Call it after a commit, not while another save into the same folder is in flight.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    committed = list_committed(root)
    kept = {p.resolve() for p in committed[:keep]}
    if protect is not None:
        kept.add(Path(protect).resolve())
    doomed = [p for p in committed[keep:] if p.resolve() not in kept]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
