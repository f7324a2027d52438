"""The commit protocol of <run>/checkpoints/: a checkpoint counts once its manifest.json, written last, is in place.

On a local or shared folder every file goes under tmp-*, the manifest last, then one rename to step-XXXXXXXX:
a crash leaves a tmp-* folder (never counted, removed by `prune`) or a complete checkpoint. On object storage,
which has no rename, each rank uploads the files it wrote straight to step-XXXXXXXX/ and rank 0 uploads
manifest.json after every rank's uploads returned ("manifest last"): a prefix without a manifest is an
interrupted upload, never a checkpoint, and `prune` removes it. Either way only a step folder whose manifest
lists every file with its size is resumed (the sha256 of each file is checked by the ranks that read it).
DeepSpeed's `latest` file is not used: the newest committed folder is found by listing. See docs/storage.md.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from raylm.checkpoint.manifest import MANIFEST, bad_file, read_checkpoint_manifest, write_manifest
from raylm.errors import CheckpointError, ConfigError
from raylm.fsync import fsync_path
from raylm.log import get_logger
from raylm.storage.location import (
    Location,
    as_location,
    file_sizes,
    folders,
    is_remote,
    local_view,
    put_file,
    read_bytes,
    remove_tree,
)

STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = "tmp-"
RESUME_POLICIES = ("auto", "required", "never")


def step_dir_name(step: int) -> str:
    """The committed folder name of a step: step-00000200 (zero-padded so names sort like steps)."""
    return f"step-{step:08d}"


def step_of(path: Location | str) -> int | None:
    """The step a step-XXXXXXXX folder name encodes, else None."""
    match = STEP_DIR.match(as_location(path).name)
    return int(match.group(1)) if match else None


def new_tmp_dir(checkpoints_dir: Location | str, step: int, cache_dir: str = "") -> Path:
    """Create the local folder a save writes into before its commit (rank 0, before any file is written).

    A folder: <dir>/tmp-step-XXXXXXXX-<nonce>/. A prefix: the same name in this node's mirror of it, and any
    step-XXXXXXXX/ objects already there (a run that resumed from an older step) are deleted first, manifest
    first, so the new files never mix with old ones under a manifest."""
    root = as_location(checkpoints_dir)
    if is_remote(root):
        remove_tree(root / step_dir_name(step), first=(MANIFEST,))
    local = local_view(root, cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    tmp = local / f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def upload_own_files(tmp: Path, checkpoints_dir: Location | str, step: int, files: dict[str, dict]) -> None:
    """On object storage, upload the files this rank wrote into `tmp` to step-XXXXXXXX/ and drop the local
    copies (each rank its own files, all ranks at once); nothing to do for a folder (the commit renames it)."""
    root = as_location(checkpoints_dir)
    if not is_remote(root):
        return
    final = root / step_dir_name(step)
    for rel_path in files:
        put_file(tmp / rel_path, final / rel_path)
        (tmp / rel_path).unlink()


def commit(
    tmp: Path, step: int, files: dict[str, dict], extra: dict, checkpoints_dir: Location | str | None = None
) -> Location:
    """Write the manifest (after every file is complete) and make the save a checkpoint: rename `tmp` to
    step-XXXXXXXX, or on object storage (checkpoints_dir a prefix) upload manifest.json last.

    A committed folder of the same step (a run that resumed from an older one) is replaced: it is first
    renamed to a tmp-* name, so no half-replaced folder is ever counted (on object storage new_tmp_dir has
    already deleted it).
    """
    manifest = write_manifest(tmp, step, files, extra)
    root = as_location(checkpoints_dir) if checkpoints_dir is not None else tmp.parent
    if is_remote(root):
        final: Location = root / step_dir_name(step)
        put_file(manifest, final / MANIFEST)  # the commit point
        shutil.rmtree(tmp, ignore_errors=True)
        return final
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


def list_checkpoints(checkpoints_dir: Location | str, uploads: bool = False) -> list[Location]:
    """Every step-XXXXXXXX folder, newest step first, committed or not (see list_committed). On object storage a
    prefix without manifest.json is an upload still running or interrupted: listed only when `uploads`."""
    root = as_location(checkpoints_dir)
    steps = [root / name for name in folders(root) if step_of(name) is not None]
    if is_remote(root) and not uploads:
        steps = [p for p in steps if read_bytes(p / MANIFEST) is not None]
    return sorted(steps, key=lambda p: step_of(p) or 0, reverse=True)  # every listed name has a step


def is_committed(folder: Location) -> bool:
    """A step folder whose manifest.json exists and parses (file hashes are checked by verify_checkpoint)."""
    try:
        read_checkpoint_manifest(folder)
    except CheckpointError:
        return False
    return True


def list_committed(checkpoints_dir: Location | str) -> list[Location]:
    """Committed checkpoints, newest step first; tmp-* folders and step folders without a manifest never count."""
    return [p for p in list_checkpoints(checkpoints_dir) if is_committed(p)]


def check_sizes(folder: Location) -> dict:
    """The manifest, once every file it lists exists with its listed size: the cheap check (one listing), no file
    is read. The sha256 of each file is checked at load by the ranks that read it (raylm.checkpoint.state)."""
    manifest = read_checkpoint_manifest(folder)
    sizes = file_sizes(folder)
    for rel_path, record in manifest["files"].items():
        if rel_path not in sizes:
            raise bad_file(folder, rel_path, "is missing")
        if sizes[rel_path] != record["bytes"]:
            raise bad_file(
                folder,
                rel_path,
                f"has {sizes[rel_path]} bytes but the manifest lists "
                f"{record['bytes']} (truncated or overwritten)",
            )
    return manifest


def resume_candidates(checkpoints_dir: Location | str, policy: str) -> list[Location]:
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
        raise ConfigError(
            f"checkpoint.resume={policy!r} is not one of {'|'.join(RESUME_POLICIES)}; "
            f"set checkpoint.resume=auto"
        )
    if policy == "never":
        return []
    candidates = list_checkpoints(checkpoints_dir)
    if policy == "required":
        if not candidates:
            raise CheckpointError(
                f"checkpoint.resume=required but {checkpoints_dir} holds no committed checkpoint; "
                f"point run.dir/run.name at the run to resume, or set checkpoint.resume=auto"
            )
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


def every_checkpoint_damaged(checkpoints_dir: Location | str, damaged: list[Location]) -> CheckpointError:
    """The error for a run whose checkpoints all fail their checks: nothing is deleted, the user decides."""
    names = ", ".join(folder.name for folder in damaged)
    return CheckpointError(
        f"every checkpoint in {checkpoints_dir} is damaged ({names}; the warnings above name "
        f"each bad file) and nothing was deleted: restore them from a copy, or start over with "
        f"--overwrite or another run.name"
    )


def pick_resume(checkpoints_dir: Location | str, policy: str) -> Location | None:
    """The newest of resume_candidates (manifest and sizes checked, not hashes), or None to start fresh."""
    candidates = resume_candidates(checkpoints_dir, policy)
    return candidates[0] if candidates else None


def prune(
    checkpoints_dir: Location | str, keep: int, protect: Location | str | None = None
) -> list[Location]:
    """Delete committed checkpoints beyond the newest `keep`, and every stale tmp-* folder (on object storage:
    every step prefix without a manifest, an interrupted upload); returns what went.

    `protect` (the checkpoint this run resumed from) is never deleted, even when newer but corrupt folders
    outnumber `keep`. Call it after a commit, not while another save into the same folder is in flight. A
    committed checkpoint on object storage loses its manifest first, so a half-deleted one never counts.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    root = as_location(checkpoints_dir)
    committed = list_committed(root)
    kept = {_identity(p) for p in committed[:keep]}
    if protect is not None:
        kept.add(_identity(as_location(protect)))
    doomed = [p for p in committed[keep:] if _identity(p) not in kept]
    if is_remote(root):
        committed_names = {p.name for p in committed}
        doomed += [p for p in list_checkpoints(root, uploads=True) if p.name not in committed_names]
    else:
        doomed += [root / n for n in folders(root) if n.startswith(TMP_PREFIX)]
    for path in doomed:
        remove_tree(path, first=(MANIFEST,))
    return doomed


def _identity(loc: Location) -> str:
    return str(loc) if is_remote(loc) else str(Path(loc).resolve())
