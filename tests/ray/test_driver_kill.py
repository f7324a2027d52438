"""SIGKILL of the `raylm train` driver itself: no training worker outlives it by more than 30 s, and rerunning the
same command finishes the run bit-identical to an uninterrupted one (from step 0 without --overwrite when no
checkpoint was committed yet, else from the newest committed checkpoint).

What ends the workers: with a local Ray (no RAY_ADDRESS) the driver started the GCS and raylet with kernel fate
sharing (PR_SET_PDEATHSIG), so they die with it and every worker exits when its raylet goes (Ray's node agents,
DashboardAgent and RuntimeEnvAgent, which run no training work, were seen to take longer than 30 s). On a cluster
(RAY_ADDRESS, `ray job submit`) the GCS sees the job's driver gone and kills the job's actors: Ray Train's
controller and, since it owns them, the worker group, whose placement group goes with the job."""

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
from tests.conftest import REPO_ROOT
from tests.ray.test_interrupt import start_cli_run
from tests.ray.test_recovery import committed, run_losses

pytestmark = pytest.mark.slow  # three CLI runs with a local Ray each, and a reference: ~4 minutes on 2 cores
RUN = ("train.max_steps=12", "checkpoint.every_steps=4", "parallel.pp=2")


def kill_driver_when(proc: subprocess.Popen, run_dir: Path, ready) -> list[psutil.Process]:
    """SIGKILL the driver once ready(run_dir) holds; the processes it had started (a local Ray's, if any)."""
    deadline = time.monotonic() + 300
    while not ready(run_dir):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return descendants


NODE_AGENTS = (
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)  # no training work; they notice the raylet's end late


def named(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return "gone"


def logged(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= 1


def has_commit(run_dir: Path) -> bool:
    return bool(list((run_dir / "checkpoints").glob("step-*")))


def training_workers() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])
    ]


def wait_until_gone(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_driver_sigkill_with_a_local_ray(ray_cluster, small_config, tmp_path):
    reference = small_config("reference", *RUN)
    train(reference)
    cfg = small_config("driver-killed", *RUN)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    for ready in (logged, has_commit):  # before any commit, then after the first
        started = psutil.pids()
        descendants = kill_driver_when(start_cli_run(cfg, tmp_path), run_dir, ready)
        assert descendants, "the driver had started a local Ray"
        _, alive = psutil.wait_procs(descendants, timeout=30)
        agents = [p for p in alive if named(p) in NODE_AGENTS]
        assert not [p for p in alive if p not in agents], (
            f"outlived the driver by 30 s: {list(map(named, alive))}"
        )
        assert not [pid for pid in training_workers() if pid not in started]
        _, alive = psutil.wait_procs(agents, timeout=120)
        assert not alive, f"Ray's node agents outlived the driver by 150 s: {list(map(named, alive))}"
        if ready is logged:
            assert not committed(cfg), "the first kill landed before any commit"
    rerun = start_cli_run(cfg, tmp_path)  # the same command: no --overwrite
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert run_losses(cfg) == run_losses(reference)


def test_driver_sigkill_on_a_cluster(ray_cluster, small_config, tmp_path):
    from ray.util.state import list_actors

    reference = small_config("reference", *RUN)
    train(reference)
    cfg = small_config("cluster-driver-killed", *RUN)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    before = set(training_workers())
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "train", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_driver_when(proc, Path(cfg.run.dir) / cfg.run.name, has_commit)
    assert not wait_until_gone(lambda: [pid for pid in training_workers() if pid not in before])
    assert not wait_until_gone(
        lambda: [
            a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "TrainController"
        ]
    )
    train(cfg)  # the same run again, here in-process: resumes from the committed checkpoint
    assert run_losses(cfg) == run_losses(reference)
