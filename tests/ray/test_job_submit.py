"""A real `ray start --head` + `ray job submit` of jobs/train.py on the tiny config, as the README shows.

Every command runs in an environment without any RAY_ variable, as a new shell has it (the test process itself
carries the ones its own Ray set, RAY_AUTH_MODE among them); the token settings come from the README's commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylm.train.metrics import read_metrics
from tests.conftest import REPO_ROOT, SMALL_MODEL

RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow  # its own `ray start --head`: a cluster start besides the session's


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_shell_env() -> dict[str, str]:
    """This process's environment without Ray's variables, as a new shell would have it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def start_head(gcs_port: int, dashboard_port: int, temp_dir: Path, env: dict) -> subprocess.Popen:
    """`ray start --head --block` in its own process group, so the test stops exactly this cluster and no other."""
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--num-cpus=3",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
            # the test session's own Ray already holds the default agent port (52365)
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        ready = subprocess.run(
            [RAY, "job", "list", f"--address=http://127.0.0.1:{dashboard_port}"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        if ready.returncode == 0:
            return head
        time.sleep(2)
    stop_head(head)
    raise AssertionError("the Ray head's Jobs API did not come up within 120 s")


def stop_head(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def test_ray_job_submit_trains_tiny(prepared, small_corpus, tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=fresh_shell_env(), check=True, capture_output=True
    )
    env = {
        **fresh_shell_env(),
        "RAY_AUTH_MODE": "token",
    }  # README: RAY_AUTH_MODE=token on the head and the client
    head = start_head(gcs_port, dashboard_port, Path("/tmp") / f"raylm-job-{os.getpid()}", env)
    try:
        bare = subprocess.run(
            [RAY, "job", "list", f"--address=http://127.0.0.1:{dashboard_port}"],
            env=fresh_shell_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bare.returncode != 0 and "token" in (bare.stdout + bare.stderr).lower(), (
            "a client without RAY_AUTH_MODE=token must be refused: the README's export is what makes submit work"
        )
        overrides = [
            *SMALL_MODEL,
            "parallel.pp=2",
            f"data.paths=['{small_corpus}']",
            f"data.out_dir={prepared}",
            f"run.dir={tmp_path / 'runs'}",
            "run.name=submitted",
        ]
        command = [
            RAY,
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dashboard_port}",
            "--working-dir",
            str(REPO_ROOT),
            "--runtime-env",
            str(REPO_ROOT / "jobs" / "runtime_env.yaml"),
            "--",
            sys.executable,
            "jobs/train.py",
            "jobs/configs/tiny.yaml",
            *overrides,
        ]
        for _ in range(30):  # the head's job agent comes up a little after its Jobs API answers
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        run = tmp_path / "runs" / "submitted"
        assert (
            len(read_metrics(run)) == 4 and (run / "checkpoints" / "step-00000004" / "manifest.json").exists()
        )
    finally:
        stop_head(head)
