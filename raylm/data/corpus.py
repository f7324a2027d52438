"""Corpus readers, the first step of prepare: files, folders and globs of text, JSON Lines or Parquet -> documents.

data.paths entries may also be s3:// or gs:// URIs: one object, or every object with a text suffix under a prefix
(no globs); they are read through pyarrow.fs, so every node that runs a prepare task needs the storage variables.

A document is (doc_id, text, replaced_bytes). doc_id is the file's path relative to the folder or glob base it
was found under (plus `:LINE` for JSON Lines, `:ROW` for Parquet, `#PIECE` for a text file read in pieces); it
names the document in the train/val split, so it does not depend on where the corpus lives.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from raylm.errors import DataError
from raylm.log import get_logger
from raylm.storage.fs import filesystem, storage_errors
from raylm.storage.uri import is_uri, parse_uri

# Suffixes a folder walk picks up; a file named directly or by a glob is read whatever its suffix.
TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".py", ".jsonl", ".ndjson", ".parquet"}
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
READ_BUFFER_BYTES = 8 << 20  # reads of an object are buffered in pieces this large (each is a request)
BINARY_PROBE_BYTES = 8192  # like git: a NUL byte in the first 8 KiB means binary
# Installed third-party packages below a named folder or glob base (a Python's lib/pythonX.Y holds its
# site-packages) are not that corpus; name such a folder itself to read it.
INSTALLED_PARTS = frozenset({"site-packages", "dist-packages"})
GLOB_MAGIC = re.compile(r"[*?\[]")
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of an undecodable byte

Document = tuple[str, str, int]


@dataclass(frozen=True)
class CorpusFile:
    path: (
        str  # absolute, symlinks kept (two links to one folder are two copies of the corpus), or an s3:// URI
    )
    doc_id: str
    size_bytes: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        suffix = Path(self.path).suffix.lower()
        return "parquet" if suffix == ".parquet" else "jsonl" if suffix in JSONL_SUFFIXES else "text"


@dataclass(frozen=True)
class ReadPolicy:
    decode_errors: str = (
        "replace"  # replace: each undecodable byte becomes U+FFFD and is counted; strict: fail
    )
    text_field: str = "text"
    max_doc_bytes: int = 1 << 22

    @classmethod
    def from_config(cls, data) -> ReadPolicy:
        return cls(
            decode_errors=data.decode_errors, text_field=data.text_field, max_doc_bytes=data.max_doc_bytes
        )


def default_paths() -> list[str]:
    """The default corpus: this interpreter's standard-library sources."""
    return [os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")]


def list_files(paths: list[str]) -> list[CorpusFile]:
    """Every file that data.paths names, in a stable order, each once; empty paths = the default corpus."""
    patterns = list(paths) or default_paths()
    found: dict[str, CorpusFile] = {}
    for pattern in patterns:
        for file in _expand(pattern):
            found.setdefault(file.path, file)
    return list(found.values())


def _expand(pattern: str) -> list[CorpusFile]:
    if is_uri(pattern):
        return _expand_uri(pattern)
    expanded = os.path.abspath(os.path.expanduser(pattern))
    if os.path.isfile(expanded):
        return [_corpus_file(expanded, os.path.dirname(expanded))]
    if os.path.isdir(expanded):
        files = _walk(expanded)
    else:
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f"data.paths entry {pattern!r} matches no file or folder; fix the path or glob")
        base = _glob_base(expanded)
        files = [
            f for m in matches for f in ([_corpus_file(m, base)] if os.path.isfile(m) else _walk(m, base))
        ]
        files = _without_installed(files, pattern)
    if not files:
        raise DataError(
            f"data.paths entry {pattern!r} holds no readable files (a folder walk reads "
            f"{', '.join(sorted(TEXT_SUFFIXES))}); add such files or name the files with a glob"
        )
    return files


def _walk(folder: str, base: str | None = None) -> list[CorpusFile]:
    """Files with a known suffix under folder, sorted; hidden files and folders (.git, ...) are not corpus."""
    files = []
    for root, dirs, names in os.walk(folder):
        for name in sorted(INSTALLED_PARTS.intersection(dirs)):
            get_logger().info(
                "skipping %s (installed packages); name that folder itself to read it",
                os.path.join(root, name),
            )
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in INSTALLED_PARTS)
        for name in sorted(names):
            if not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES:
                files.append(_corpus_file(os.path.join(root, name), base or folder))
    return files


def _without_installed(files: list[CorpusFile], pattern: str) -> list[CorpusFile]:
    kept = [f for f in files if not INSTALLED_PARTS.intersection(Path(f.doc_id).parts)]
    if len(kept) < len(files):
        get_logger().info(
            "data.paths entry %r: skipped %d files under site-packages/dist-packages (installed "
            "packages); name such a folder itself to read it",
            pattern,
            len(files) - len(kept),
        )
    return kept


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if GLOB_MAGIC.search(p)), len(parts))]]
    return os.path.join(*fixed) if fixed else os.sep


def _expand_uri(pattern: str) -> list[CorpusFile]:
    """One object, or every object with a text suffix under a prefix (hidden names skipped), sorted by key."""
    import pyarrow.fs as pafs

    uri = parse_uri(pattern, "data.paths entry")
    fs = filesystem(uri)
    with storage_errors(uri, "list"):
        info = fs.get_file_info(uri.path)
        if info.type == pafs.FileType.File:
            return [_object_file(uri.scheme, info, uri.path.rpartition("/")[0])]
        found = fs.get_file_info(pafs.FileSelector(uri.path, allow_not_found=True, recursive=True))
    files = [
        _object_file(uri.scheme, i, uri.path)
        for i in sorted(found, key=lambda i: i.path)
        if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in TEXT_SUFFIXES
    ]
    files = [f for f in files if not any(part.startswith(".") for part in Path(f.doc_id).parts)]
    if not files:
        raise DataError(
            f"data.paths entry {pattern!r} holds no object with a text suffix "
            f"({', '.join(sorted(TEXT_SUFFIXES))}); fix the prefix or name one object"
        )
    return files


def _object_file(scheme: str, info, base: str) -> CorpusFile:
    return CorpusFile(
        path=f"{scheme}://{info.path}",
        doc_id=info.path[len(base) :].lstrip("/"),
        size_bytes=info.size,
        mtime_ns=info.mtime_ns or 0,
    )


@contextmanager
def _open_binary(file: CorpusFile) -> Iterator[BinaryIO]:
    """The file's bytes: a local file, or a buffered reader over an s3:// or gs:// object."""
    if not is_uri(file.path):
        with open(file.path, "rb") as f:
            yield f
        return
    uri = parse_uri(file.path, "data.paths entry")
    with storage_errors(uri, "read"), filesystem(uri).open_input_file(uri.path) as raw:
        yield io.BufferedReader(raw, READ_BUFFER_BYTES)


def _corpus_file(path: str, base: str) -> CorpusFile:
    stat = os.stat(path)
    return CorpusFile(
        path=path,
        doc_id=Path(os.path.relpath(path, base)).as_posix(),
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


def read_documents(file: CorpusFile, policy: ReadPolicy) -> Iterator[Document]:
    """The file's non-empty documents, in file order."""
    if file.kind == "parquet":
        return _read_parquet(file, policy)
    return _read_jsonl(file, policy) if file.kind == "jsonl" else _read_text(file, policy)


def decode(data: bytes, path: str, offset: int, policy: ReadPolicy) -> tuple[str, int]:
    """UTF-8 text and the count of bytes replaced by U+FFFD; strict mode names the first bad byte instead."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as exc:
        if policy.decode_errors == "strict":
            raise DataError(
                f"{path} is not valid UTF-8 at byte {offset + exc.start}; fix or remove the file, or set "
                f"data.decode_errors=replace to replace (and count) undecodable bytes"
            ) from None
    text, replaced = ESCAPED_BYTE.subn("\ufffd", data.decode("utf-8", "surrogateescape"))
    return text, replaced


def _refuse_binary(path: str, head: bytes) -> None:
    if b"\x00" in head:
        raise DataError(
            f"{path} looks binary (NUL bytes in its first {BINARY_PROBE_BYTES} bytes); remove it from "
            f"the corpus or narrow data.paths to text files"
        )


def refuse_binary_files(files: list[CorpusFile]) -> None:
    """Fail on the first text or JSON Lines file that looks binary (reads only each file's first bytes)."""
    for file in files:
        if file.kind != "parquet":
            with _open_binary(file) as f:
                _refuse_binary(file.path, f.read(BINARY_PROBE_BYTES))


def _read_text(file: CorpusFile, policy: ReadPolicy) -> Iterator[Document]:
    with _open_binary(file) as f:
        _refuse_binary(file.path, f.read(BINARY_PROBE_BYTES))
        f.seek(0)
        in_pieces = file.size_bytes > policy.max_doc_bytes
        for index, (offset, data) in enumerate(_pieces(f, policy.max_doc_bytes)):
            text, replaced = decode(data, file.path, offset, policy)
            if text:
                yield (f"{file.doc_id}#{index}" if in_pieces else file.doc_id), text, replaced


def _pieces(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of at most max_bytes, cut after the last newline (never inside a UTF-8 sequence)."""
    offset, carry = 0, b""
    while True:
        data = carry + f.read(max_bytes - len(carry))
        if not data:
            return
        cut = len(data) if len(data) < max_bytes else _cut_point(data)
        yield offset, data[:cut]
        offset, carry = offset + cut, data[cut:]


def _cut_point(data: bytes) -> int:
    newline = data.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    lead = len(data) - 1  # no newline: cut before a UTF-8 sequence that the piece would split
    while lead > len(data) - 4 and 0x80 <= data[lead] < 0xC0:
        lead -= 1
    needed = (
        2 if 0xC0 <= data[lead] < 0xE0 else 3 if 0xE0 <= data[lead] < 0xF0 else 4 if data[lead] >= 0xF0 else 1
    )
    return lead if lead > 0 and len(data) - lead < needed else len(data)


def _read_jsonl(file: CorpusFile, policy: ReadPolicy) -> Iterator[Document]:
    with _open_binary(file) as f:
        _refuse_binary(file.path, f.read(BINARY_PROBE_BYTES))
        f.seek(0)
        offset = 0
        for line_no, line in enumerate(f, 1):
            if line.strip():
                text, replaced = decode(line, file.path, offset, policy)
                value = _field(
                    _json_record(text, file.path, line_no), policy.text_field, f"{file.path}:{line_no}"
                )
                if value:
                    yield f"{file.doc_id}:{line_no}", value, replaced
            offset += len(line)


def _json_record(text: str, path: str, line_no: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{line_no} is not valid JSON ({exc.msg}); fix the line or remove the file from data.paths"
        ) from None


def _field(record, field: str, where: str) -> str:
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where} has no string field {field!r} (it has {keys}); set data.text_field to the field "
            f"that holds the text"
        )
    return value


def _read_parquet(file: CorpusFile, policy: ReadPolicy) -> Iterator[Document]:
    with _open_binary(file) as source:
        yield from _parquet_documents(file, policy, source)


def _parquet_documents(file: CorpusFile, policy: ReadPolicy, source: BinaryIO) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file.path} is not a readable Parquet file ({exc}); fix or remove it") from None
    field, schema = policy.text_field, parquet.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"{file.path} has no column {field!r} (columns: {', '.join(schema.names)}); set "
            f"data.text_field to the column that holds the text"
        )
    if not (
        pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)
    ):
        raise DataError(
            f"{file.path} column {field!r} holds {schema.field(field).type}, not text; set "
            f"data.text_field to a string column"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value:  # null and empty rows hold no text
                yield f"{file.doc_id}:{row}", value, 0
