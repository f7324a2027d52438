"""The run folder <run.dir>/<run.name>: refuse to clobber a used name, check storage is writable, save config."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import yaml

from raylm.config import Config, to_dict
from raylm.errors import RaylmError

FINAL_WEIGHTS = "final"


def run_path(cfg: Config) -> Path:
    """Absolute path of this run's folder (Ray workers may run elsewhere, so never relative)."""
    return (Path(cfg.run.dir).expanduser() / cfg.run.name).resolve()


def has_run_outputs(path: Path) -> bool:
    """A folder that already holds a run's results (metrics or weights), not merely an empty folder."""
    return (path / "metrics.jsonl").exists() or (path / FINAL_WEIGHTS).exists() or (path / "checkpoints").exists()


def prepare_run_dir(cfg: Config, overwrite: bool) -> Path:
    """Create the run folder; refuse a used run name unless --overwrite; fail early if storage is read-only."""
    path = run_path(cfg)
    if has_run_outputs(path):
        if not overwrite:
            raise RaylmError(f"run folder {path} already holds a run named {cfg.run.name!r}; pass --overwrite "
                             f"to replace it or choose another run.name=...")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RaylmError(f"run.dir {cfg.run.dir!r} is not writable ({exc.strerror}); point run.dir at a writable "
                         f"folder (shared storage on a cluster)") from None
    write_atomic(path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)
