"""Object operations raylm needs on a storage prefix: read, stream, upload, list and delete one object."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raylm.storage.fs import filesystem, storage_errors
from raylm.storage.uri import StorageUri

COPY_BYTES = 8 << 20  # pieces an upload or download moves at a time: memory stays flat


def read_bytes(uri: StorageUri) -> bytes | None:
    """The whole object, or None when there is none (a small file: manifest.json, tokenizer.json)."""
    fs = filesystem(uri)
    try:
        with storage_errors(uri, "read"), fs.open_input_stream(uri.path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


class _Reader:
    """read() of an object stream, its storage errors turned into one line (and only its own: an error in the
    caller's code, such as a full local disk, passes through untouched)."""

    def __init__(self, stream, uri: StorageUri):
        self.stream, self.uri = stream, uri

    def read(self, size: int = -1) -> bytes:
        with storage_errors(self.uri, "read"):
            return self.stream.read(size)


@contextmanager
def open_read(uri: StorageUri) -> Iterator[_Reader]:
    """A sequential reader of the object (FileNotFoundError when there is none)."""
    fs = filesystem(uri)
    with storage_errors(uri, "read"):
        stream = fs.open_input_stream(uri.path)
    with stream:
        yield _Reader(stream, uri)


def upload_file(local: Path, uri: StorageUri) -> None:
    """Copy a local file to the object (an S3 object appears whole or not at all, never half-written)."""
    fs = filesystem(uri)
    with storage_errors(uri, "write"), open(local, "rb") as source, fs.open_output_stream(uri.path) as target:
        shutil.copyfileobj(source, target, COPY_BYTES)


def upload_bytes(data: bytes, uri: StorageUri) -> None:
    """Write a small object (a manifest, a config) in one piece."""
    fs = filesystem(uri)
    with storage_errors(uri, "write"), fs.open_output_stream(uri.path) as target:
        target.write(data)


def object_sizes(uri: StorageUri, recursive: bool = False) -> dict[str, int]:
    """Size of every object under the prefix, by its key relative to the prefix ('model/001-layers.0.pt' when
    recursive, else only the objects directly under it); nothing for a prefix that holds none."""
    import pyarrow.fs as pafs

    fs = filesystem(uri)
    with storage_errors(uri, "list"):
        infos = fs.get_file_info(pafs.FileSelector(uri.path, allow_not_found=True, recursive=recursive))
    start = len(uri.path) + 1
    return {info.path[start:]: info.size for info in infos if info.type == pafs.FileType.File}


def sub_prefixes(uri: StorageUri) -> list[str]:
    """Names of the 'folders' directly under the prefix (keys that continue with another '/')."""
    import pyarrow.fs as pafs

    fs = filesystem(uri)
    with storage_errors(uri, "list"):
        infos = fs.get_file_info(pafs.FileSelector(uri.path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def delete_object(uri: StorageUri) -> None:
    fs = filesystem(uri)
    with storage_errors(uri, "delete"):
        fs.delete_file(uri.path)


def delete_prefix(uri: StorageUri) -> None:
    """Delete every object under the prefix (and the empty 'folder' markers pyarrow leaves behind)."""
    fs = filesystem(uri)
    try:
        with storage_errors(uri, "delete"):
            fs.delete_dir(uri.path)
    except FileNotFoundError:
        pass
