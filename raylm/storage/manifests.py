"""The steps every manifest.json read shares (data folder, checkpoint): the bytes, a JSON object, its format.

Each caller words the errors for its own users (ManifestProblem.kind says which step failed) and then checks its
own entries (shard names, file records).
"""

from __future__ import annotations

import json
from typing import Any

from raylm.storage.location import Location, read_bytes


class ManifestProblem(Exception):
    """Why a manifest cannot be used. kind: 'missing' (no such file or object), 'json' (not JSON; detail: the
    decoder's error) or 'format' (not a JSON object whose "format" is the expected one; detail: the format
    found, or the type name of what was found instead of an object)."""

    def __init__(self, kind: str, detail: Any = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def manifest_bytes(path: Location) -> bytes:
    """The whole manifest file (a local path or an object); ManifestProblem('missing') when there is none. An
    OSError while reading passes through."""
    data = read_bytes(path)
    if data is None:
        raise ManifestProblem("missing")
    return data


def parse_manifest_bytes(data: bytes, fmt: str) -> dict:
    """The JSON object in `data` (UTF-8, -16 or -32 as json.loads detects it, a BOM allowed), whose "format"
    must be `fmt`; ManifestProblem('json' or 'format') otherwise."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestProblem("json", exc) from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ManifestProblem(
            "format", manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        )
    return manifest


def load_manifest(path: Location, fmt: str) -> dict:
    """manifest_bytes, then parse_manifest_bytes: the checked JSON object of the manifest at `path`."""
    return parse_manifest_bytes(manifest_bytes(path), fmt)
