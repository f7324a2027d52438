"""One live run per run folder: a second `raylm train` is refused at once, naming the holder; kill -9 frees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from raylm.config import resolve
from raylm.errors import RaylmError
from raylm.train.driver import train
from raylm.train.run_lock import hold_run_lock
from tests.conftest import REPO_ROOT

HOLDER = """
import sys, time
from pathlib import Path
from raylm.train.run_lock import hold_run_lock
with hold_run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of <tmp>/runs/r1, as a live `raylm train` would."""
    run_dir = tmp_path / "runs" / "r1"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_second_run_is_refused_at_once_naming_the_holder(holder):
    run_dir, proc = holder
    start = time.perf_counter()
    with (
        pytest.raises(
            RaylmError,
            match=f"run folder {run_dir} is in use by another raylm run "
            f"\\(host {socket.gethostname()}, pid {proc.pid}\\)",
        ),
        hold_run_lock(run_dir),
    ):
        pass
    assert time.perf_counter() - start < 5


def test_a_lock_left_by_kill_9_is_taken_at_once(holder):
    run_dir, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with hold_run_lock(run_dir):
        assert f'"pid": {os.getpid()}' in run_dir.with_name(".r1.lock").read_text()


def test_overwrite_of_a_live_run_deletes_nothing(holder):
    run_dir, _ = holder
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    cfg = resolve({}, [f"run.dir={run_dir.parent}", "run.name=r1"])
    with pytest.raises(RaylmError, match="is in use by another raylm run"):
        train(cfg, overwrite=True)
    assert (run_dir / "metrics.jsonl").exists()
