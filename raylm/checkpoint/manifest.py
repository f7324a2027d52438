"""A checkpoint's manifest.json: every file with its size and sha256, written last, checked before any unpickling."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable

from raylm.errors import CheckpointError
from raylm.fsync import fsync_path
from raylm.safe_paths import is_inside_name

MANIFEST = "manifest.json"
FORMAT = "raylm-checkpoint/1"
READ_CHUNK_BYTES = 1 << 20


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of one file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(folder: Path, step: int, files: dict[str, dict], extra: dict) -> Path:
    """Write manifest.json (the last file of a save) listing `files` ({relative path: record})."""
    manifest = {"format": FORMAT, "step": step, "created_unix_s": round(time.time(), 3), **extra,
                "files": dict(sorted(files.items()))}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(path)
    return path


def read_manifest(folder: Path) -> dict:
    """The parsed manifest of a checkpoint folder; CheckpointError if it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a committed checkpoint (an interrupted save, or "
                              f"not a checkpoint folder); pass a step-XXXXXXXX folder that holds a manifest.json")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete {folder} so that an older checkpoint "
                              f"is used") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise CheckpointError(f"{path} is not a {FORMAT} manifest; delete {folder} so that an older checkpoint "
                              f"is used")
    unsafe = next((key for key in manifest["files"] if not is_inside_name(key)), None)
    if unsafe is not None:
        raise CheckpointError(f"{path} lists {unsafe!r}, a path outside the checkpoint folder; refusing to read it "
                              f"(the manifest was edited): delete {folder} so that an older checkpoint is used")
    return manifest


def check_file(folder: Path, rel_path: str, record: dict) -> None:
    """Raise CheckpointError naming the file when it is missing, truncated/extended or altered."""
    path = Path(folder) / rel_path
    fix = f"delete {folder} so that an older checkpoint is used"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; {fix}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes but the manifest lists {record['bytes']} "
                              f"(truncated or overwritten); {fix}")
    if file_record(path)["sha256"] != record["sha256"]:
        raise CheckpointError(f"checkpoint file {path} does not match its sha256 in the manifest (altered or "
                              f"corrupt); {fix}")


def verify_checkpoint(path: str | Path, only: Iterable[str] | None = None) -> dict:
    """Check a checkpoint's manifest and then every file it lists (or just `only`) by size and sha256.

    Nothing is unpickled here, so a bad file fails with a CheckpointError that names it, before torch.load.
    Returns the manifest.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    files = manifest["files"]
    wanted = list(files) if only is None else list(only)
    for rel_path in wanted:
        if rel_path not in files:
            raise CheckpointError(f"{folder / MANIFEST} does not list {rel_path}; the checkpoint is incomplete, "
                                  f"delete {folder} so that an older checkpoint is used")
        check_file(folder, rel_path, files[rel_path])
    return manifest
