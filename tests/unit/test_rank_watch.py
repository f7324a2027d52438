"""Stragglers judged from a table of per-rank work, a hang report written in this process, and the driver's one
line per worker-group failure (raylm.train.stragglers, raylm.train.hangs, raylm.train.fault_lines). Whole runs with
a slowed and a stopped rank: tests/distributed/test_watch_runs.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from raylm.config.schema import FaultConfig
from raylm.parallel.comm_wait import InFlight
from raylm.train.fault_lines import FaultLines, read_hang_reports
from raylm.train.hangs import HangWatch, is_collective_timeout
from raylm.train.stragglers import StragglerWatch, slowest_of

NODES = ["3e61f5" + "0" * 50, "9a1b2c" + "0" * 50, "host-b", "host-c"]


def watch(**fault) -> StragglerWatch:
    return StragglerWatch(FaultConfig(**fault), report_every=4, engine=None, rank=0, nodes=NODES)


def test_the_metrics_carry_the_slowest_rank_against_the_median():
    table = torch.tensor([[0.2, 0.2], [0.9, 1.1], [0.3, 0.3], [0.2, 0.4]], dtype=torch.float64)
    assert slowest_of(table) == pytest.approx(
        {"slowest_rank": 1, "slowest_rank_s": 1.0, "median_rank_s": 0.3}
    )


def test_a_straggler_is_named_once_after_its_steps_in_a_row(warnings_seen):
    stragglers = watch(straggler_factor=1.5, straggler_steps=3)
    slow = [0.2, 1.0, 0.2, 0.2]  # rank 1 at 5x the median
    fast = [0.2, 0.2, 0.2, 0.2]
    columns = [
        slow,
        slow,
        fast,
        slow,
        slow,
        slow,
        slow,
    ]  # broken after two steps; named at the third in a row
    table = torch.tensor(columns, dtype=torch.float64).T
    named = stragglers._judge(table, first_step=10)
    assert named == {"rank": 1, "node": "9a1b2c", "work_s": 1.0, "median_s": 0.2, "steps": 3}
    assert stragglers._judge(table, first_step=17) is None  # once
    (line,) = [r.getMessage() for r in warnings_seen.records]
    assert line.startswith(
        "rank 1 on node 9a1b2c is a straggler: 1.000 s of work per step against a median of "
    )
    assert "(5.0x) for 3 steps up to step 16;" in line


def test_ranks_within_the_factor_are_not_stragglers(warnings_seen):
    stragglers = watch(straggler_factor=1.5, straggler_steps=1)
    table = torch.tensor([[0.2, 0.29, 0.2, 0.2]] * 5, dtype=torch.float64).T
    assert stragglers._judge(table, first_step=0) is None and not warnings_seen.records


def hang_reports(tmp_path: Path, ranks: list[int], in_flight: InFlight | None) -> Path:
    for rank in ranks:
        hangs = HangWatch(tmp_path, rank, 5.0, "20261207T224512Z", NODES, lambda: in_flight)
        hangs.beat(7)
        hangs.report("no step ended within fault.hang_s=5 s")
    return tmp_path / "hangs" / "20261207T224512Z"


def test_a_hang_report_says_where_the_rank_waits_and_holds_its_stacks(tmp_path):
    call = InFlight("all_reduce", (0, 1, 2, 3), time.monotonic() - 6)
    folder = hang_reports(tmp_path, [0], call)
    text = (folder / "rank-00000.txt").read_text()
    assert text.startswith(f"rank 0 on node {NODES[0]}, pid ")
    assert "reason: no step ended within fault.hang_s=5 s\nlast step ended: 7 (" in text
    assert "blocked in: torch.distributed.all_reduce with ranks [0, 1, 2, 3] for 6." in text
    assert "node of rank 3: host-c" in text
    assert (
        "in test_a_hang_report_says_where_the_rank_waits_and_holds_its_stacks" in text
    )  # faulthandler's stack


def test_the_driver_line_names_the_ranks_that_did_not_arrive(tmp_path):
    lines = FaultLines(tmp_path)
    folder = hang_reports(tmp_path, [0, 2, 3], InFlight("all_reduce", (0, 1, 2, 3), time.monotonic()))
    assert read_hang_reports(folder).missing == [1]
    assert lines.line({}, failure=1, max_failures=6) == (
        "rank 1 on node 9a1b2c did not arrive (no step ended within fault.hang_s=5 s; ranks 0, 2, 3 waited in "
        f"torch.distributed.all_reduce with ranks [0, 1, 2, 3]; their stacks: {folder}); restarting from the "
        "start, failure 1 of 6"
    )
    assert "did not arrive" not in lines.line({}, failure=2, max_failures=6)  # each folder once
    assert "did not arrive" not in FaultLines(tmp_path, since=time.time() + 1).line(
        {}, 1, 6
    )  # an older run's


def test_the_driver_line_names_a_dead_rank_and_the_restart_step(tmp_path):
    (tmp_path / "placement").mkdir()
    (tmp_path / "placement" / "rank-00001.json").write_text(f'{{"rank": 1, "node_id": "{NODES[0]}"}}')
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000010" / "manifest.json").write_text(
        json.dumps({"format": "raylm-checkpoint/1", "files": {}})
    )
    # Ray Train wraps a dead worker's error in a health-check failure
    failures = {
        1: WorkerHealthCheckFailedError("worker 1 failed", ActorDiedError()),
        0: RuntimeError("closed"),
    }
    assert FaultLines(tmp_path).line(failures, failure=1, max_failures=6) == (
        "rank 1 on node 3e61f5 died (its process was killed or crashed); restarting from step 10, failure 1 of 6"
    )
    assert (
        FaultLines(tmp_path)
        .line(failures, failure=3, max_failures=2)
        .endswith("; no restarts left (failure 3, fault.max_failures=2)")
    )


def test_only_timeouts_are_hangs():
    assert is_collective_timeout(
        RuntimeError("[gloo/transport/tcp/pair.cc:1] Timed out waiting 20000ms for recv")
    )
    assert not is_collective_timeout(RuntimeError("Connection closed by peer [127.0.0.1]:2473. GLHF!"))
