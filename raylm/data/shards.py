"""Shard format between prepare and stream: flat token files plus manifest.json, written atomically and verified.

A prepared folder holds tokenizer.json, manifest.json and shard files `<split>-<tag>-<index>.bin`: raw
little-endian token ids (uint16 when the vocab fits, else uint32), documents back to back, each ending with EOT.
The manifest ("raylm-shards/1") lists every shard with its split, tokens, docs (EOT count), dtype, bytes and
sha256, plus the sha256 of tokenizer.json and vocab_size. Nothing reads a shard the manifest does not vouch for.
A prepared folder may also be an s3:// or gs:// prefix holding the same objects (see raylm.data.cache).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np

from raylm.data.tokenizer import file_sha256, tokenizer_object, tokenizer_path
from raylm.errors import DataError
from raylm.safe_paths import is_inside_name
from raylm.storage.file_names import MANIFEST_FILE, TOKENIZER_FILE
from raylm.storage.manifests import ManifestProblem, manifest_bytes, parse_manifest_bytes
from raylm.storage.uri import StorageUri, is_uri, parse_uri

FORMAT = "raylm-shards/1"
SPLITS = ("train", "val")
FIX = "run `raylm prepare CONFIG` to rebuild the folder"
SHARD_NAME = re.compile(r"^(train|val)-[0-9a-f]{8}-\d{5}\.bin$")  # what ShardWriter names a shard
SCAN_TOKENS = 1 << 22  # verify reads shards in pieces of this many tokens: memory stays flat


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian on disk whatever the machine)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays of one split to shard files cut at exactly shard_tokens tokens."""

    def __init__(
        self, out_dir: str | Path, split: str, dtype: np.dtype, shard_tokens: int, eot: int, tag: str = ""
    ):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, np.dtype(dtype)
        self.shard_tokens, self.eot, self.tag = shard_tokens, eot, tag
        self.entries: list[dict] = []
        self._file: BinaryIO | None = None

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            assert self._file is not None  # _open set it
            room = self.shard_tokens - self._tokens
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._tokens += len(part)
            self._docs += int(np.count_nonzero(part == self.eot))
            if self._tokens == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard; the manifest entries of every shard written, in order."""
        if self._file is not None:
            self._finish()
        return self.entries

    def _open(self) -> None:
        tag = f"-{self.tag}" if self.tag else ""
        self._name = f"{self.split}{tag}-{len(self.entries):05d}.bin"
        self._file = open(self.out_dir / self._name, "wb")  # noqa: SIM115 (open across writes; close() shuts it)
        self._hash, self._tokens, self._docs = hashlib.sha256(), 0, 0

    def _finish(self) -> None:
        assert self._file is not None  # only called with a shard open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.entries.append(
            {
                "file": self._name,
                "split": self.split,
                "tokens": self._tokens,
                "docs": self._docs,
                "dtype": self.dtype.str,
                "bytes": self._tokens * self.dtype.itemsize,
                "sha256": self._hash.hexdigest(),
            }
        )


def read_data_manifest(out_dir: str | Path) -> dict:
    """manifest.json of a prepared folder (or s3://, gs:// prefix), checked for its format; DataError otherwise."""
    return parse_manifest(*manifest_data(out_dir))


def manifest_data(out_dir: str | Path | StorageUri) -> tuple[bytes, str, str]:
    """(bytes, where they were read, folder) of a prepared folder's or prefix's manifest.json; DataError
    naming the fix when there is none."""
    folder: Path | StorageUri
    if isinstance(out_dir, StorageUri) or is_uri(out_dir):
        folder = out_dir if isinstance(out_dir, StorageUri) else parse_uri(str(out_dir), "data folder")
    else:
        folder = Path(out_dir).expanduser()
    try:
        return manifest_bytes(folder / MANIFEST_FILE), str(folder / MANIFEST_FILE), str(folder)
    except ManifestProblem:
        raise DataError(
            f"no prepared data in {folder} ({MANIFEST_FILE} missing); run `raylm prepare` "
            f"on a config with data.out_dir={folder}"
        ) from None


def parse_manifest(data: bytes, where: str, folder: str) -> dict:
    """The manifest in `data` (read from `where`), checked for its format and for shard names inside folder."""
    try:
        manifest = parse_manifest_bytes(data, FORMAT)
    except ManifestProblem as problem:
        if problem.kind == "json":
            raise DataError(f"{where} is not valid JSON ({problem.detail}); {FIX}") from None
        raise DataError(f"{where} is not a {FORMAT} manifest (format={problem.detail!r}); {FIX}") from None
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(e, dict) and is_inside_name(e.get("file")) and "/" not in e["file"] for e in shards
    ):
        raise DataError(
            f"{where} lists a shard file outside {folder} (or no shard list); refusing to read "
            f"it (the manifest was edited); {FIX}"
        )
    return manifest


def check_shard_size(folder: Path, entry: dict) -> Path:
    """The shard's path, after checking that it exists with the manifest's size (a stat, no read)."""
    path = folder / entry["file"]
    if not path.is_file():
        raise DataError(f"shard {entry['file']} named in the manifest is missing from {folder}; {FIX}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(
            f"shard {path} has {size} bytes but the manifest says {entry['bytes']} (truncated or "
            f"overwritten); {FIX}"
        )
    return path


class ShardDigest:
    """sha256, byte count and largest token id of a shard's bytes, fed in pieces of any length."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)
        self.hash, self.bytes, self.top, self._carry = hashlib.sha256(), 0, 0, b""

    def update(self, data: bytes) -> None:
        self.hash.update(data)
        self.bytes += len(data)
        data = self._carry + data
        whole = len(data) // self.dtype.itemsize * self.dtype.itemsize  # a piece may end inside a token
        if whole:
            self.top = max(self.top, int(np.frombuffer(data[:whole], dtype=self.dtype).max()))
        self._carry = data[whole:]

    def check(self, where: str, entry: dict, vocab_size: int) -> None:
        """DataError naming `where` unless size, sha256 and token ids match the manifest entry."""
        if self.bytes != entry["bytes"]:
            raise DataError(
                f"shard {where} has {self.bytes} bytes but the manifest says {entry['bytes']} "
                f"(truncated or overwritten); {FIX}"
            )
        if self.hash.hexdigest() != entry["sha256"]:
            raise DataError(
                f"shard {where} has sha256 {self.hash.hexdigest()[:16]}... but the manifest says "
                f"{entry['sha256'][:16]}... (edited or corrupted); {FIX}"
            )
        if self.top >= vocab_size:
            raise DataError(
                f"shard {where} holds token id {self.top} >= vocab size {vocab_size} recorded in the "
                f"manifest (shards from another tokenizer?); {FIX}"
            )


def check_shard(folder: Path, entry: dict, vocab_size: int) -> None:
    """Full check of one shard: size, sha256 and every token id below vocab_size."""
    path = check_shard_size(folder, entry)
    digest = ShardDigest(entry["dtype"])
    tokens = (
        np.memmap(path, dtype=entry["dtype"], mode="r") if entry["bytes"] else np.zeros(0, entry["dtype"])
    )
    for start in range(0, len(tokens), SCAN_TOKENS):
        digest.update(tokens[start : start + SCAN_TOKENS].tobytes())
    del tokens
    digest.check(str(path), entry, vocab_size)


def check_tokenizer(folder: Path, manifest: dict) -> None:
    """The tokenizer the manifest names must be the one that wrote the shards; so must tokenizer.json, unless it is
    the previous commit's tokenizer (its sha256-named copy still beside it): a prepare stopped between the manifest
    and tokenizer.json, which readers do not mind (they take the sha256-named copy) and a rerun completes."""
    sha = manifest["tokenizer_sha256"]
    path = tokenizer_path(folder, sha)
    if not path.is_file():
        raise DataError(f"{path} is missing; {FIX}")
    plain = folder / TOKENIZER_FILE
    for candidate in (path, plain) if path != plain and plain.is_file() else (path,):
        found = file_sha256(candidate)
        if found != sha and not (candidate == plain and (folder / tokenizer_object(found)).is_file()):
            raise DataError(
                f"{candidate} is another tokenizer than the one that wrote the shards (sha256 "
                f"{found[:16]}... vs {sha[:16]}... in {MANIFEST_FILE}); {FIX}"
            )


def split_summary(manifest: dict) -> dict[str, dict]:
    """Tokens, docs and shard count per split."""
    splits: dict[str, dict] = {}
    for entry in manifest["shards"]:
        row = splits.setdefault(entry["split"], {"tokens": 0, "docs": 0, "shards": 0})
        row["tokens"] += entry["tokens"]
        row["docs"] += entry["docs"]
        row["shards"] += 1
    return splits
