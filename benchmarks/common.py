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


def machine_busy_s() -> float | None:
    """CPU seconds every core of the machine has been busy since boot (/proc/stat), None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How many cores other processes kept busy while a measurement ran: the machine's busy time less this
    process tree's, over the wall time (None off Linux). A figure measured beside a busy neighbour says so."""

    def __enter__(self) -> OtherLoad:
        self.start = (time.perf_counter(), machine_busy_s(), own_cpu_s())
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self.start
        busy1 = machine_busy_s()
        if busy0 is not None and busy1 is not None:
            other = (busy1 - busy0) - (own_cpu_s() - own0)
            self.cores = max(0.0, other) / max(1e-9, time.perf_counter() - wall0)
