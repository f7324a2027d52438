"""Keep `raylm prepare` from replacing a prepared folder while a `raylm train` reads it, and the reverse.

The lock is an `fcntl.flock` on `<folder>/.readers.lock`: each `raylm train` holds it shared for its whole run
(every local data folder it reads), and `raylm prepare` takes it exclusive, without waiting, before it writes
anything, and keeps it until its commit and clean-up are done. So prepare never deletes or replaces shards
that a running training is reading: it refuses at once, naming the folder, and a rerun after the training
ends proceeds. A holder killed with -9 releases it at once (the kernel drops the lock with the process).

Limits: the lock only separates processes that see the same lock, i.e. on one machine or on a shared
filesystem whose flock reaches every client (NFSv4, CephFS); a training that opens its folder read-only (it
cannot create the lock file) runs unlocked. Prefixes on object storage (s3://, gs://) are not locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from raylm.errors import DataError
from raylm.log import get_logger

LOCK_FILE = ".readers.lock"


@contextlib.contextmanager
def reading(folders: Iterable[str | Path]) -> Iterator[None]:
    """Hold every folder's lock shared for the `with` block; DataError when a prepare is writing one of them."""
    fds = []
    try:
        for folder in folders:
            fd = _open(Path(folder))
            if fd is None:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(
                    f"`raylm prepare` is rewriting {folder}; wait for it to finish, then train"
                ) from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Hold the folder's lock exclusively for the `with` block; DataError when a training reads it (or another
    prepare writes it)."""
    fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{folder} is in use: a running `raylm train` reads it or another `raylm prepare` writes "
                f"it; prepare would replace its shards, so wait for that run to end or set another "
                f"data.out_dir"
            ) from None
        yield
    finally:
        os.close(fd)


def _open(folder: Path) -> int | None:
    try:
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        get_logger().debug("no readers lock in %s (%s): reading it unlocked", folder, exc.strerror)
        return None
