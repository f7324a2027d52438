"""A checkpoint's manifest.json: every file with its size and sha256, written last, checked before any unpickling.

The checkpoint may be a local folder or an object-storage prefix (raylm.storage.location): a file of a prefix
is checked as it is downloaded into this node's mirror of it, where the loading code then reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from raylm.errors import CheckpointError
from raylm.fsync import fsync_path
from raylm.safe_paths import is_inside_name
from raylm.storage.file_names import MANIFEST_FILE
from raylm.storage.location import (
    Location,
    as_location,
    fetch_verified,
    is_remote,
    local_problem,
    local_view,
    sha256_of,
)
from raylm.storage.manifests import ManifestProblem, load_manifest

MANIFEST = MANIFEST_FILE
FORMAT = "raylm-checkpoint/1"


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of one file, read in chunks (never the whole file in memory)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def write_manifest(folder: Path, step: int, files: dict[str, dict], extra: dict) -> Path:
    """Write manifest.json (the last file of a save) listing `files` ({relative path: record})."""
    manifest = {
        "format": FORMAT,
        "step": step,
        "created_unix_s": round(time.time(), 3),
        **extra,
        "files": dict(sorted(files.items())),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(path)
    return path


def read_checkpoint_manifest(folder: Location | str) -> dict:
    """The parsed manifest of a checkpoint folder or prefix; CheckpointError if it is missing or unreadable."""
    folder = as_location(folder)
    path = folder / MANIFEST
    try:
        manifest = load_manifest(path, FORMAT)
    except OSError as exc:
        raise CheckpointError(
            f"{path} is unreadable ({exc}); delete {folder} so that an older checkpoint is used"
        ) from None
    except ManifestProblem as problem:
        if problem.kind == "missing":
            raise CheckpointError(
                f"{path} is missing: {folder} is not a committed checkpoint (an interrupted "
                f"save, or not a checkpoint folder); pass a step-XXXXXXXX folder that holds "
                f"a manifest.json"
            ) from None
        if problem.kind == "json":
            raise CheckpointError(
                f"{path} is unreadable ({problem.detail}); delete {folder} so that an "
                f"older checkpoint is used"
            ) from None
        manifest = None
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"{path} is not a {FORMAT} manifest; delete {folder} so that an older checkpoint is used"
        )
    unsafe = next((key for key in manifest["files"] if not is_inside_name(key)), None)
    if unsafe is not None:
        raise CheckpointError(
            f"{path} lists {unsafe!r}, a path outside the checkpoint folder; refusing to read it "
            f"(the manifest was edited): delete {folder} so that an older checkpoint is used"
        )
    return manifest


def bad_file(folder: Location, rel_path: str, problem: str) -> CheckpointError:
    """The error for one checkpoint file that fails its manifest check: it names the file and the way out."""
    return CheckpointError(
        f"checkpoint file {folder / rel_path} {problem}; delete {folder} so that an older checkpoint is used"
    )


def check_file(folder: Location, rel_path: str, record: dict, cache_dir: str = "") -> None:
    """Raise CheckpointError naming the file when it is missing, truncated/extended or altered. A file of a
    prefix is checked while it is fetched into local_view(folder, cache_dir), where it is read afterwards."""
    if is_remote(folder):
        problem = fetch_verified(folder / rel_path, local_view(folder, cache_dir) / rel_path, record)
    else:
        problem = local_problem(folder / rel_path, record)
    if problem is not None:
        raise bad_file(folder, rel_path, problem)


def verify_checkpoint(path: Location | str, only: Iterable[str] | None = None, cache_dir: str = "") -> dict:
    """Check a checkpoint's manifest and then every file it lists (or just `only`) by size and sha256.

    Nothing is unpickled here, so a bad file fails with a CheckpointError that names it, before torch.load.
    For a prefix the checked files are then in local_view(path, cache_dir). Returns the manifest.
    """
    folder = as_location(path)
    manifest = read_checkpoint_manifest(folder)
    files = manifest["files"]
    wanted = list(files) if only is None else list(only)
    for rel_path in wanted:
        if rel_path not in files:
            raise CheckpointError(
                f"{folder / MANIFEST} does not list {rel_path}; the checkpoint is incomplete, "
                f"delete {folder} so that an older checkpoint is used"
            )
        check_file(folder, rel_path, files[rel_path], cache_dir)
    return manifest
