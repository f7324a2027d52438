"""SIGINT and SIGTERM of `raylm train`: exit 130 / 143 with one line naming the newest committed checkpoint, no
worker process left, and a rerun of the same command that matches an uninterrupted run exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from raylm.config import to_dict
from raylm.train.driver import train
from raylm.train.metrics import read_metrics
from tests.conftest import REPO_ROOT

# each test's `raylm train` starts its own local Ray, as a user's shell would: two cluster starts, so `slow`
pytestmark = pytest.mark.slow
LONG = ("train.max_steps=40", "checkpoint.every_steps=2", "parallel.pp=2")


def start_cli_run(cfg, tmp_path: Path) -> subprocess.Popen:
    """`raylm train CONFIG` in a fresh process with its own local Ray, as a user's shell would start it."""
    config = tmp_path / f"{cfg.run.name}.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "train", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_after_first_commit(
    proc: subprocess.Popen, run_dir: Path, signum: int
) -> tuple[int, str, float]:
    """Wait for a committed checkpoint, send the signal; (exit code, stderr, seconds from signal to exit)."""
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was committed"
        time.sleep(0.2)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
    return proc.returncode, err, took


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def test_sigterm_stops_cleanly_and_the_rerun_matches_an_uninterrupted_run(
    ray_cluster, small_config, tmp_path, references
):
    cfg = small_config("stopped", *LONG)
    code, err, took = interrupt_after_first_commit(
        start_cli_run(cfg, tmp_path), Path(cfg.run.dir) / "stopped", signal.SIGTERM
    )
    assert code == 143 and took < 60, (code, took, err[-2000:])
    assert last_line(err).startswith(
        "raylm: error: interrupted by SIGTERM: the newest committed checkpoint is "
    )
    assert "/checkpoints/step-" in last_line(err) and "run the same command to resume" in last_line(err)
    train(cfg)  # the same command again: resumes
    rows = read_metrics(Path(cfg.run.dir) / "stopped")
    expected = references.rows(*LONG)
    assert [(r["step"], r["loss"], r["samples_sha"]) for r in rows] == [
        (r["step"], r["loss"], r["samples_sha"]) for r in expected
    ]  # bit-identical, each step once
    assert any("resumed_from" in r for r in rows)


def test_sigint_exits_130_naming_the_checkpoint(ray_cluster, small_config, tmp_path):
    cfg = small_config("ctrl-c", *LONG)
    code, err, took = interrupt_after_first_commit(
        start_cli_run(cfg, tmp_path), Path(cfg.run.dir) / "ctrl-c", signal.SIGINT
    )
    assert code == 130 and took < 60, (code, took, err[-2000:])
    assert last_line(err).startswith(
        "raylm: error: interrupted by SIGINT: the newest committed checkpoint is "
    )
