"""Checks on the prepared data before any worker starts: it exists and matches the config's tokenizer and vocab."""

from __future__ import annotations

import json
from pathlib import Path

from raylm.config import Config
from raylm.errors import DataError


def data_folders(cfg: Config) -> list[Path]:
    """The prepared folders a run reads: each data.sources path, or data.out_dir."""
    paths = [s["path"] for s in cfg.data.sources] or [cfg.data.out_dir]
    return [Path(p).expanduser() for p in paths]


def check_prepared_data(cfg: Config) -> None:
    """Fail with the fix when a data folder is missing or was prepared for another tokenizer or vocab size."""
    for folder in data_folders(cfg):
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise DataError(f"no prepared data in {folder} (manifest.json missing); run `raylm prepare CONFIG` "
                            f"with the same config first")
        manifest = json.loads(manifest_path.read_text())
        vocab = manifest.get("vocab_size")
        if vocab != cfg.data.vocab_size:
            raise DataError(f"{folder} was prepared with vocab_size={vocab} but data.vocab_size="
                            f"{cfg.data.vocab_size}; re-run `raylm prepare` with this config or set "
                            f"data.vocab_size={vocab}")
