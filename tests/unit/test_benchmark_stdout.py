"""Benchmarks print only JSON on stdout: once benchmarks/common.py is imported, what libraries and child processes
print goes to stderr (DeepSpeed's "Setting accelerator to CPU" is a logger writing to sys.stdout)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

PROGRAM = """
import logging, subprocess, sys
sys.path.insert(0, "benchmarks")
import common
print("a library's line")
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
logging.getLogger("lib").info("Setting accelerator to CPU")
subprocess.run(["echo", "a child's line"], check=True)
common.emit(figure=1.5)
"""


def test_only_json_reaches_stdout():
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"figure": 1.5}]
    for line in ("a library's line", "Setting accelerator to CPU", "a child's line"):
        assert line in done.stderr
