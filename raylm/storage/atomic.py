"""Atomic writes: a temp file beside the target, fsynced, renamed over it; on object storage one put (atomic there).

Every file raylm replaces in place (a manifest, a config, metrics.jsonl, an export's files) goes through here,
so a reader sees the old content or the new, never half of it, and a crash leaves at most a hidden temp file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from raylm.fsync import fsync_path
from raylm.storage.objects import upload_bytes
from raylm.storage.uri import StorageUri

TMP_MARK = (
    ".tmp-"  # a temp file is `.<name>.tmp-<nonce>`: hidden, never a shard, checkpoint or tmp-* folder name
)


def temp_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this write."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` for the block to write (by any library); when the block ends without an error
    the file is fsynced and renamed over `path`, else it is removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file open for writing whose content replaces `path` only when the block ends without an error."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a whole local file atomically (text is written as UTF-8)."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    """JSON (indented, with a final newline) written atomically."""
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a local file so that `dst` holds the old bytes or all of the new."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def put_atomic(target: Path | StorageUri, data: str | bytes) -> None:
    """A small file written whole: atomically in a folder, in one put (atomic on object storage) to a prefix."""
    data = data.encode() if isinstance(data, str) else data
    if isinstance(target, StorageUri):
        upload_bytes(data, target)
    else:
        write_atomic(target, data)
