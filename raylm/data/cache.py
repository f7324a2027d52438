"""The node-local cache of prepared data on object storage: fetch once per node, verify while downloading.

A prefix `s3://bucket/data` is mirrored into `<data.cache_dir>/<bucket>-<hash of the URI>/`: manifest.json
(fetched fresh when a stream opens), tokenizer.json and the shards, each fetched the first time a reader needs it.
Crash-safety: a shard is downloaded to a `.part` file beside its final name while its sha256, size and token ids
are checked against the manifest; only a shard that passes is fsynced and renamed to its final name, so a name in
the cache always holds verified bytes (a failed, corrupted or interrupted download leaves at most a `.part`,
removed at once or by the next download). A file lock per shard means ranks sharing a node wait for one download
instead of fetching the same shard twice. After the rename, readers memory-map the file exactly as a local shard.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raylm.data.shards import (
    FIX,
    SHARD_NAME,
    ShardDigest,
    check_shard,
    check_shard_size,
    check_tokenizer,
    manifest_data,
    parse_manifest,
    read_data_manifest,
    split_summary,
)
from raylm.data.tokenizer import file_sha256, tokenizer_object, tokenizer_path
from raylm.errors import DataError
from raylm.log import get_logger
from raylm.storage.atomic import write_atomic, write_json_atomic
from raylm.storage.file_names import MANIFEST_FILE, TOKENIZER_FILE
from raylm.storage.location import download, mirror_folder
from raylm.storage.objects import COPY_BYTES, open_read, read_bytes
from raylm.storage.uri import StorageUri, is_uri, parse_uri

LOCKS = ".locks"
CACHE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


cache_folder = mirror_folder  # the node-local folder that mirrors one prefix (raylm.storage.location)


def open_cached(uri_text: str, cache_dir: str, refresh: bool = True) -> tuple[Path, dict]:
    """(local folder, manifest) of a prefix: the manifest (fresh from storage when refresh, or when the cache has
    none) and tokenizer.json are in place; shards come later, one fetch_shard each."""
    uri = parse_uri(uri_text, "data source")
    folder = cache_folder(uri, cache_dir)
    local = folder / MANIFEST_FILE
    if refresh or not local.is_file():
        data, where, _ = manifest_data(uri)
        manifest = parse_manifest(data, where, str(uri))
        with _cache_writes(folder, MANIFEST_FILE):
            folder.mkdir(parents=True, exist_ok=True)
            if not local.is_file() or local.read_bytes() != data:
                write_json_atomic(local, manifest)
                _drop_stale_shards(folder, manifest)
    else:
        manifest = parse_manifest(local.read_bytes(), str(local), str(folder))
    _fetch_tokenizer(uri, folder, manifest["tokenizer_sha256"])
    return folder, manifest


def _drop_stale_shards(folder: Path, manifest: dict) -> None:
    """The prefix was prepared again: remove this cache's shards its new manifest no longer names (a process
    still reading one keeps its memory map; the name is gone)."""
    names = {e["file"] for e in manifest["shards"]}
    for path in folder.iterdir():
        if SHARD_NAME.match(path.name) and path.name not in names:
            path.unlink(missing_ok=True)


def local_tokenizer(out_dir: str, cache_dir: str) -> Path:
    """Where a local copy of a prepared folder's tokenizer.json is: in the folder, or (for a prefix) in this node's
    cache, fetched and checked first when it is not there yet."""
    if not is_uri(out_dir):
        folder = Path(out_dir).expanduser()
        try:
            return tokenizer_path(folder, read_data_manifest(folder)["tokenizer_sha256"])
        except DataError:  # no usable manifest: the plain name, which the caller checks
            return folder / TOKENIZER_FILE
    return open_cached(out_dir, cache_dir, refresh=False)[0] / TOKENIZER_FILE


def read_tokenizer(uri: StorageUri, sha256: str) -> bytes:
    """The tokenizer bytes the manifest names (by its sha256 name, else tokenizer.json), checked."""
    data = read_bytes(uri.join(tokenizer_object(sha256)))
    where = uri.join(tokenizer_object(sha256) if data is not None else TOKENIZER_FILE)
    data = read_bytes(where) if data is None else data
    if data is None:
        raise DataError(f"{uri.join(TOKENIZER_FILE)} is missing; {FIX}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{where} is another tokenizer than the one that wrote the shards (sha256 differs from "
            f"{MANIFEST_FILE}); {FIX}"
        )
    return data


def _fetch_tokenizer(uri: StorageUri, folder: Path, sha256: str) -> None:
    target = folder / TOKENIZER_FILE
    if target.is_file() and file_sha256(target) == sha256:
        return
    data = read_tokenizer(uri, sha256)
    with _cache_writes(folder, TOKENIZER_FILE):
        write_atomic(target, data)


def fetch_shard(uri_text: str, folder: Path, entry: dict, vocab_size: int) -> Path:
    """The shard's local path, downloading and verifying it first unless the cache already holds it."""
    target = folder / entry["file"]
    if _complete(folder, entry):
        return target
    with _shard_lock(folder, entry["file"]):
        if _complete(folder, entry):  # another rank on this node fetched it while we waited
            return target
        _download(parse_uri(uri_text, "data source").join(entry["file"]), folder, entry, vocab_size)
    return target


def _complete(folder: Path, entry: dict) -> bool:
    try:
        check_shard_size(folder, entry)
        return True
    except DataError:
        return False


@contextmanager
def _shard_lock(folder: Path, name: str) -> Iterator[None]:
    locks = folder / LOCKS
    with _cache_writes(folder, name):
        locks.mkdir(parents=True, exist_ok=True)
        lock = open(locks / f"{name}.lock", "w")  # noqa: SIM115 (held past this block: closed by the with below)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        yield


def _download(uri: StorageUri, folder: Path, entry: dict, vocab_size: int) -> None:
    """Object -> .part (hashed as it arrives) -> checked -> fsynced -> renamed (storage.location.download)."""
    digest = ShardDigest(entry["dtype"])
    _check_room(folder, entry)
    get_logger().info("cache: fetching %s (%d bytes) into %s", uri, entry["bytes"], folder)
    with _cache_writes(folder, entry["file"]):
        problem = download(
            uri, folder / entry["file"], digest.update, lambda: digest.check(str(uri), entry, vocab_size)
        )
    if problem is not None:
        raise DataError(f"shard {uri} named in the manifest is missing from storage; {FIX}")


def _check_room(folder: Path, entry: dict) -> None:
    free = shutil.disk_usage(folder).free
    if free < entry["bytes"]:
        raise DataError(
            f"data.cache_dir {folder.parent} has {free} bytes free, too few for shard {entry['file']} "
            f"({entry['bytes']} bytes); free space there or set data.cache_dir to a node-local folder "
            f"with room for the data"
        )


@contextmanager
def _cache_writes(folder: Path, name: str) -> Iterator[None]:
    """A full or read-only cache becomes one line naming data.cache_dir."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in CACHE_FULL:
            raise
        raise DataError(
            f"cannot write {name} into data.cache_dir {folder.parent} ({os.strerror(exc.errno)}); "
            f"free space there or set data.cache_dir to a writable node-local folder"
        ) from None


def verify_remote(uri_text: str) -> dict:
    """`raylm data verify` on a prefix: the tokenizer and every shard object read once and checked; the manifest."""
    uri = parse_uri(uri_text, "data folder")
    manifest = parse_manifest(*manifest_data(uri))
    read_tokenizer(uri, manifest["tokenizer_sha256"])
    for entry in manifest["shards"]:
        digest = ShardDigest(entry["dtype"])
        try:
            with open_read(uri.join(entry["file"])) as stream:
                while data := stream.read(COPY_BYTES):
                    digest.update(data)
        except FileNotFoundError:
            raise DataError(
                f"shard {uri.join(entry['file'])} named in the manifest is missing; {FIX}"
            ) from None
        digest.check(str(uri.join(entry["file"])), entry, manifest["vocab_size"])
    return manifest


def verify(out_dir: str | Path) -> dict:
    """Check the tokenizer and every shard against manifest.json; a summary dict, or DataError naming the
    shard. An s3:// or gs:// prefix is checked by reading each object once (nothing is written to the
    cache)."""
    if is_uri(out_dir):
        folder, manifest = str(out_dir), verify_remote(str(out_dir))
    else:
        folder = str(Path(out_dir).expanduser())
        manifest = read_data_manifest(folder)
        check_tokenizer(Path(folder), manifest)
        for entry in manifest["shards"]:
            check_shard(Path(folder), entry, manifest["vocab_size"])
    return {
        "ok": True,
        "dir": folder,
        "shards": len(manifest["shards"]),
        "tokens": manifest["tokens"],
        "vocab_size": manifest["vocab_size"],
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "splits": split_summary(manifest),
    }
