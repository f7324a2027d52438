"""Checks on the prepared data before any worker starts: it exists and matches the config's tokenizer and vocab."""

from __future__ import annotations

from pathlib import Path

from raylm.config import Config
from raylm.data.shards import read_data_manifest
from raylm.errors import DataError
from raylm.storage.uri import is_uri


def data_folders(cfg: Config) -> list[str]:
    """The prepared folders (or s3://, gs:// prefixes) a run reads: each data.sources path, or data.out_dir."""
    paths = [s["path"] for s in cfg.data.sources] or [cfg.data.out_dir]
    return [p if is_uri(p) else str(Path(p).expanduser()) for p in paths]


def local_data_folders(cfg: Config) -> list[str]:
    """The data folders on a filesystem (not object storage) that exist: those a readers lock can cover."""
    return [folder for folder in data_folders(cfg) if not is_uri(folder) and Path(folder).is_dir()]


def check_prepared_data(cfg: Config) -> None:
    """Fail with the fix when a data folder is missing or was prepared for another tokenizer or vocab size; a
    prefix on object storage is read here too, so a missing bucket or a silent endpoint fails before workers start."""
    for folder in data_folders(cfg):
        manifest = read_data_manifest(folder)
        vocab = manifest.get("vocab_size")
        if vocab != cfg.data.vocab_size:
            raise DataError(
                f"{folder} was prepared with vocab_size={vocab} but data.vocab_size="
                f"{cfg.data.vocab_size}; re-run `raylm prepare` with this config or set "
                f"data.vocab_size={vocab}"
            )
