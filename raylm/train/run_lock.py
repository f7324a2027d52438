"""One live `raylm train` per run folder: an advisory lock beside it, released by the kernel when its holder dies.

The lock file is `<run.dir>/.<run.name>.lock`, a sibling of the run folder, so `--overwrite` (which deletes the
folder) never deletes a lock that another process holds. It is an `fcntl.flock`, so a holder killed with -9
leaves no stale lock behind: the next run takes it at once. The file's text names the holder (host, pid) for
the error a second run prints.

Object storage has no locks (and a lease object without a heartbeat cannot tell a live holder from a dead
one), so for a run on an s3:// or gs:// prefix the lock is taken beside this machine's local folder for the
prefix: it keeps two runs started from one machine apart, not runs started from two (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from raylm.errors import RaylmError
from raylm.storage.location import Location, local_view


def lock_path(run_dir: Location, cache_dir: str = "") -> Path:
    """Where the lock of a run folder lives: beside it, inside run.dir (for a prefix: beside its local folder)."""
    local = local_view(run_dir, cache_dir)
    return local.with_name(f".{local.name}.lock")


@contextlib.contextmanager
def hold_run_lock(run_dir: Location, cache_dir: str = "") -> Iterator[None]:
    """Hold the run folder's lock for the `with` block; RaylmError naming the holder if another run has it."""
    path = lock_path(run_dir, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RaylmError(
                f"run folder {run_dir} is in use by another raylm run ({_holder(path)}); wait for it to "
                f"finish or stop it, or choose another run.name=..."
            ) from None
        holder = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "since_unix_s": round(time.time())}
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _holder(path: Path) -> str:
    """'host H, pid P' from the lock file's text (best effort: it may be mid-write)."""
    try:
        holder = json.loads(path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
