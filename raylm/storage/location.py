"""One set of file operations over a local folder or an object-storage prefix, so run and checkpoint code has one path.

A Location is a pathlib.Path or a StorageUri; both take `loc / "name"` and `loc.name`. Writes to a prefix go
through a node-local mirror folder (`mirror_folder`) when a file is built locally first; reads of a prefix land
there too, each file verified against its size and sha256 before it takes its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from raylm.fsync import fsync_path
from raylm.storage.atomic import put_atomic
from raylm.storage.objects import (
    COPY_BYTES,
    delete_object,
    delete_prefix,
    object_sizes,
    open_read,
    sub_prefixes,
    upload_file,
)
from raylm.storage.objects import read_bytes as read_object
from raylm.storage.uri import StorageUri, is_uri, parse_uri

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

Location = Path | StorageUri
CACHE_NAME = "raylm-cache"
PART_SUFFIX = ".part"  # a download in progress (part_name)
MISSING = "is missing"


def as_location(value: str | Path | StorageUri, key: str = "path") -> Location:
    """A StorageUri for `s3://...`/`gs://...` (StorageError naming `key` for another scheme), else a Path."""
    if isinstance(value, (Path, StorageUri)):
        return value
    return parse_uri(value, key) if is_uri(value) else Path(value).expanduser()


def is_remote(loc: Location) -> TypeIs[StorageUri]:
    return isinstance(loc, StorageUri)


def cache_root(cache_dir: str) -> Path:
    """data.cache_dir, or <system temp folder>/raylm-cache when it is '' (resolved on each node)."""
    return Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir()) / CACHE_NAME


def mirror_folder(uri: StorageUri, cache_dir: str) -> Path:
    """The node-local folder that mirrors one prefix (data, a run, a checkpoint) under data.cache_dir."""
    return cache_root(cache_dir) / f"{uri.bucket}-{hashlib.sha256(str(uri).encode()).hexdigest()[:16]}"


def local_view(loc: Location, cache_dir: str = "") -> Path:
    """Where this node reads and writes the files of a location: the folder itself, or a prefix's mirror."""
    return mirror_folder(loc, cache_dir) if is_remote(loc) else loc


def read_bytes(loc: Location) -> bytes | None:
    """A whole (small) file, or None when there is none."""
    if is_remote(loc):
        return read_object(loc)
    return loc.read_bytes() if loc.is_file() else None


def write_text(loc: Location, text: str) -> None:
    """A small file written whole: atomically in a folder, in one request to a prefix."""
    put_atomic(loc, text)


def put_file(local: Path, loc: Location) -> None:
    """Copy a local file to the location (nothing to do when the location is that file)."""
    if is_remote(loc):
        upload_file(local, loc)
    elif Path(local).resolve() != loc.resolve():
        loc.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, loc)


def file_sizes(loc: Location) -> dict[str, int]:
    """{path relative to the location: bytes} of every file under it, at any depth ({} when there is none)."""
    if is_remote(loc):
        return object_sizes(loc, recursive=True)
    if not loc.is_dir():
        return {}
    return {p.relative_to(loc).as_posix(): p.stat().st_size for p in loc.rglob("*") if p.is_file()}


def folders(loc: Location) -> list[str]:
    """Names of the folders (on object storage: sub-prefixes) directly under the location."""
    if is_remote(loc):
        return sub_prefixes(loc)
    return sorted(p.name for p in loc.iterdir() if p.is_dir()) if loc.is_dir() else []


def delete_files(loc: Location, names: list[str]) -> None:
    """Delete these files (relative names) under the location, in the order given; a missing one is no error."""
    for name in names:
        if is_remote(loc):
            with contextlib.suppress(FileNotFoundError):
                delete_object(loc / name)
        else:
            (loc / name).unlink(missing_ok=True)


def remove_tree(loc: Location, first: tuple[str, ...] = ()) -> None:
    """Delete everything under the location; the files named in `first` go before the others (a manifest, so a
    half-deleted checkpoint is never taken for a committed one)."""
    if not is_remote(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    names = list(file_sizes(loc))
    delete_files(loc, [n for n in first if n in names])
    delete_prefix(loc)


def remove_empty_folders(loc: Location, names: tuple[str, ...]) -> None:
    """Remove the named sub-folders that hold no file any more (on object storage, pyarrow's empty markers)."""
    for name in names:
        if not file_sizes(loc / name):
            if is_remote(loc):
                delete_prefix(loc / name)
            else:
                shutil.rmtree(loc / name, ignore_errors=True)


def fetch_verified(uri: StorageUri, target: Path, record: dict) -> str | None:
    """Download an object to `target` unless it already holds the bytes `record` lists ({"bytes", "sha256"}),
    checking size and sha256 as it arrives. Returns None when `target` is good, else what is wrong with the
    object (missing, size, sha256); a bad download never takes the final name."""
    if target.is_file() and _local_problem(target, record) is None:
        return None
    return _fetch(uri, target, lambda size, sha256: _problem(size, sha256, record))


def _fetch(uri: StorageUri, target: Path, check: Callable[[int, str], str | None]) -> str | None:
    """download() hashing the object with sha256 as it arrives; check(size, sha256) decides."""
    digest, size = hashlib.sha256(), [0]

    def feed(data: bytes) -> None:
        digest.update(data)
        size[0] += len(data)

    return download(uri, target, feed, lambda: check(size[0], digest.hexdigest()))


def part_name(target: Path) -> Path:
    """A download's temporary name beside target: hidden, never a shard name, unique to process and thread."""
    return target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}{PART_SUFFIX}")


def download(
    uri: StorageUri, target: Path, feed: Callable[[bytes], None], check: Callable[[], str | None]
) -> str | None:
    """Object -> `.part` beside target, each piece handed to feed() as it arrives -> check() -> fsynced and
    renamed to target when the check returns None; returns the check's problem, or 'is missing' when there is
    no object (check may also raise). Nothing else is left behind: a name in a mirror holds checked bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_name(target)
    try:
        try:
            with open_read(uri) as stream, open(part, "wb") as out:
                while data := stream.read(COPY_BYTES):
                    feed(data)
                    out.write(data)
        except FileNotFoundError:
            return MISSING
        problem = check()
        if problem is None:
            fsync_path(part)
            os.replace(part, target)
            fsync_path(target.parent)
        return problem
    finally:
        part.unlink(missing_ok=True)


def local_problem(path: Path, record: dict) -> str | None:
    """What is wrong with a local file against its record (missing, size, sha256), or None."""
    return MISSING if not path.is_file() else _local_problem(path, record)


def _local_problem(path: Path, record: dict) -> str | None:
    size = path.stat().st_size
    if size != record["bytes"]:
        return _problem(size, "", record)
    return _problem(size, sha256_of(path), record)


def _problem(size: int, sha256: str, record: dict) -> str | None:
    if size != record["bytes"]:
        return f"has {size} bytes but the manifest lists {record['bytes']} (truncated or overwritten)"
    if sha256 != record["sha256"]:
        return "does not match its sha256 in the manifest (altered or corrupt)"
    return None


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in pieces (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def upload_folder(local: Path, uri: StorageUri, last: tuple[str, ...] = ()) -> list[str]:
    """Upload every file under a local folder to the prefix (the names in `last` after all others: the file
    that marks the folder complete); returns the relative names uploaded."""
    names = sorted(file_sizes(local))
    ordered = [n for n in names if n not in last] + [n for n in last if n in names]
    for name in ordered:
        upload_file(local / name, uri / name)
    return ordered


def download_folder(uri: StorageUri, cache_dir: str = "") -> Path:
    """Every object under the prefix into this node's mirror of it, each checked against the size the listing
    gives (a folder with no manifest of hashes, such as an export); the mirror folder."""
    local = mirror_folder(uri, cache_dir)
    for name, size in file_sizes(uri).items():
        target = local / name
        if target.is_file() and target.stat().st_size == size:
            continue
        problem = _fetch(uri / name, target, _size_check(size))
        if problem is not None:
            raise OSError(f"{uri / name} {problem} (changed while it was read); try again")
    return local


def _size_check(size: int) -> Callable[[int, str], str | None]:
    """A _fetch check that names a byte count other than `size`."""
    return lambda got, _: None if got == size else f"has {got} bytes, not {size}"
