"""Shared benchmark plumbing: prepared data on demand, a raylm run in-process, steady-state figures, JSON lines.

Importing it makes stdout hold JSON lines only: the process's file descriptor 1 is pointed at stderr, so what
DeepSpeed, torch, Ray and child processes write there ("Setting accelerator to CPU", "Using topology ...") goes
to stderr, and `emit` writes to the original stdout. Import it before anything that prints."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from raylm.config import Config, load_config  # noqa: E402
from raylm.train.metrics import read_metrics  # noqa: E402

TINY = REPO_ROOT / "jobs" / "configs" / "tiny.yaml"


def _json_stdout():
    """The original stdout as a file of its own; file descriptor 1 (and so sys.stdout, and every child process's
    stdout) then writes to stderr."""
    sys.stdout.flush()
    original = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return original


STDOUT = _json_stdout()


def emit(**figures: Any) -> None:
    """Print one JSON object per line, the benchmarks' output format (the only lines on stdout)."""
    print(json.dumps(figures), file=STDOUT, flush=True)


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def ensure_prepared(cfg: Config) -> None:
    """Run `raylm prepare` for the config (a no-op when its data folder is already up to date)."""
    from raylm.data.prepare import prepare

    prepare(cfg)


def run_training(config_path: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """Train in this process through the public driver; return (metrics rows, wall seconds from the call)."""
    from raylm.train.driver import train

    cfg = load_config(config_path, overrides)
    ensure_prepared(cfg)
    start = time.time()
    train(cfg, overwrite=True)
    return read_metrics(Path(cfg.run.dir) / cfg.run.name), start


def steady(rows: list[dict], key: str, skip: int) -> float:
    """Median of a per-step figure after `skip` warm-up steps (medians shrug off a noisy neighbour)."""
    values = [r[key] for r in rows[skip:]] or [r[key] for r in rows]
    return statistics.median(values)
