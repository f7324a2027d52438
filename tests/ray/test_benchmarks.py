"""The GPU benchmark's CPU dry mode runs end to end, so the script does not rot on machines without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_benchmark_dry_mode_prints_its_figures():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["dry"] is True and figures["steps"] == 4 and (figures["pp"], figures["tp"], figures["dp"]) == (1, 1, 1)
    assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
