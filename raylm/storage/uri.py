"""Storage URIs (`s3://bucket/prefix`, `gs://bucket/prefix`): recognise, parse and join them; refuse other schemes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from raylm.errors import StorageError

SCHEMES = ("s3", "gs")
SUPPORTED = "a local path, s3://bucket/prefix or gs://bucket/prefix"
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
USERINFO = re.compile(r"://[^/@]*@")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")  # S3 and GCS bucket names


def is_uri(value: object) -> bool:
    """True for anything of the form `scheme://...` (a supported scheme or not); local paths are False."""
    return isinstance(value, str) and URI.match(value) is not None


@dataclass(frozen=True)
class StorageUri:
    """A parsed URI: scheme, bucket and key prefix (no leading or trailing '/')."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> str:
        """The path pyarrow.fs takes: `bucket/key`."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def join(self, name: str) -> StorageUri:
        """The object `name` under this prefix (name is a plain relative key such as `manifest.json`)."""
        return StorageUri(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)

    __truediv__ = join  # `prefix / "manifest.json"`, as for a pathlib.Path

    @property
    def name(self) -> str:
        """The last component of the key ('' for a whole bucket), as Path.name."""
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> StorageUri:
        return StorageUri(self.scheme, self.bucket, self.key.rpartition("/")[0])


def shown(value: object) -> str:
    """repr(value) for a message, with any `user:secret@` of a URI masked: credentials are never echoed."""
    return repr(USERINFO.sub("://***@", value) if isinstance(value, str) else value)


def parse_uri(value: str, key: str = "path") -> StorageUri:
    """Parse `s3://bucket/prefix` or `gs://...`; StorageError naming `key` for another scheme or a bad bucket."""
    match = URI.match(value)
    if match is None:
        raise StorageError(f"{key}={shown(value)} is not a storage URI; use {SUPPORTED}")
    if USERINFO.search(value):
        raise StorageError(
            f"{key}={shown(value)} carries credentials in the URI; remove them and set them in the "
            f"environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, see docs/storage.md)"
        )
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise StorageError(
            f"{key}={shown(value)} uses the scheme {scheme}://, which raylm does not read or write; use "
            f"{SUPPORTED}"
        )
    bucket, _, prefix = rest.partition("/")
    if not BUCKET.match(bucket):
        raise StorageError(
            f"{key}={shown(value)} has no valid bucket name ({bucket!r}: 3 or more lower-case letters, "
            f"digits, '.', '-' or '_'); write it as {scheme}://BUCKET/prefix"
        )
    parts = [part for part in prefix.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise StorageError(f"{key}={shown(value)} has a '.' or '..' component; write the prefix without them")
    return StorageUri(scheme, bucket, "/".join(parts))


NOT_YET = {  # where a URI is not built yet: refused with this fix, instead of writing a local folder named 's3:'
    "model.init_from": "initial weights are read from a local Hugging Face folder only; download it first",
    "data.tokenizer": "a given tokenizer is read from a local file only; copy it to a local path",
    "data.cache_dir": "the cache is node-local by design; set a local folder such as /tmp/raylm-cache",
}


def refuse_uri(key: str, value: object, why: str) -> None:
    """StorageError for a URI where raylm cannot use one yet (`why` says what to do instead); nothing for a path."""
    if is_uri(value):
        raise StorageError(
            f"{key}={shown(value)}: {why} (URIs work in run.dir, data.out_dir, data.paths, "
            f"data.sources, and the sources and output of generate, export and eval)"
        )
