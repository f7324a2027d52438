"""One rule for file names read out of manifests: plain relative paths that cannot leave the folder they name."""

from __future__ import annotations

from pathlib import PurePosixPath


def is_inside_name(key: object) -> bool:
    """True for a relative POSIX path of plain components ('model/001-layers.0.pt'); False for an absolute
    path, '..', '.', empty components, backslashes or NUL: a manifest naming such a file is refused, never read."""
    if not isinstance(key, str) or not key or "\\" in key or "\0" in key or key.startswith("/"):
        return False
    parts = key.split("/")
    return all(part not in ("", ".", "..") for part in parts) and not PurePosixPath(key).is_absolute()
