"""A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in a folder) for the tracking tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.s3_server import free_port

SERVER_START_S = 180  # 20-40 s here: its SQLite schema migrations and job workers


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """Start the server on a free port with its store and artifacts under `root`; yields its URI once /health
    answers, and stops it (and the workers it started, in their own session) afterwards."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    with (root / "server.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, server, root / "server.log")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, in their own session
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: it may not finish shutting down in time
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def wait_healthy(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server not healthy after {SERVER_START_S} s: {log.read_text()[-2000:]}")
