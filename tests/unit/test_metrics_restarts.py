"""metrics.jsonl across worker-group restarts: each step once, in order, whatever point the group restarts from,
and fault drill lists (several kills per run) parse and validate."""

from __future__ import annotations

import json

import pytest

from raylm.config import resolve
from raylm.config.drills import parse_drills
from raylm.errors import ConfigError
from raylm.train.metrics import MetricsWriter, read_metrics


def attempt(run_dir, start_step: int, steps: range, tag: str) -> None:
    writer = MetricsWriter(run_dir, start_step)
    for step in steps:
        writer.write({"step": step, "loss": 1.0, "attempt": tag})
    writer.close()


def test_each_step_is_logged_once_across_restarts(tmp_path):
    attempt(tmp_path, 0, range(0, 3), "first")  # killed after step 2, before any checkpoint
    attempt(tmp_path, 0, range(0, 7), "second")  # starts again from step 0: the first attempt's rows go
    with (tmp_path / "metrics.jsonl").open("a") as torn:
        torn.write('{"step": 7, "lo')  # SIGKILL in mid-write
    attempt(tmp_path, 4, range(4, 10), "third")  # resumed from the step-4 checkpoint
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(10))
    assert [r["attempt"] for r in rows] == ["second"] * 4 + ["third"] * 6


def test_drill_lists_parse_and_name_real_ranks():
    assert parse_drills("step@3:1,mid-files@6,after-commit@8:3", default_rank=2) == [
        ("step", 3, 1),
        ("mid-files", 6, 2),
        ("after-commit", 8, 3),
    ]
    resolve({}, ["parallel.pp=2", "parallel.dp=2", "fault.drill=step@3:1,mid-files@6:3"])
    with pytest.raises(ConfigError, match="fault.drill rank 4 .* is not a rank of the 4 workers"):
        resolve({}, ["parallel.pp=2", "parallel.dp=2", "fault.drill=step@3:4"])
    with pytest.raises(ConfigError, match="is not PHASE@STEP"):
        resolve({}, ["fault.drill=step@3;mid-files@4"])
    json.dumps(parse_drills("", 0))
