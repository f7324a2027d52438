"""A stalled (SIGSTOPped) rank on a real TorchTrainer (pp=1, dp=2, gloo): its peers' collectives time out
and Ray Train restarts the group, which resumes bit-identical to an uninterrupted run; the live rank's hang report
says where it waited. The NaN and spike policies run without Ray: tests/distributed/test_fault_runs.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from raylm.storage.file_names import HANGS_DIR
from raylm.train.driver import train
from raylm.train.fault_lines import read_hang_reports
from raylm.train.metrics import read_metrics
from tests.ray.test_recovery import STEPS, WorkerKiller, run_losses

DP2 = "parallel.dp=2"


def rows_of(cfg) -> list[dict]:
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(len(rows))), "each step logged once, in order"
    return rows


@pytest.mark.slow
def test_stalled_rank_fails_its_collectives_and_the_group_resumes_bitwise(
    ray_cluster, small_config, references
):
    expected = references.losses(*STEPS, DP2)
    timeout_s = 20
    cfg = small_config(
        "stalled", *STEPS, DP2, f"fault.collective_timeout_s={timeout_s}", "fault.max_failures=1"
    )
    # it holds its sockets open: no peer sees it die
    stopper = WorkerKiller(cfg, steps=3, signum=signal.SIGSTOP)
    try:
        train(cfg)
    finally:
        if stopper.pid and psutil.pid_exists(stopper.pid):
            os.kill(stopper.pid, signal.SIGCONT)
    rows = rows_of(cfg)
    assert stopper.killed_at is not None and run_losses(cfg) == expected
    resumed = [r for r in rows if "resumed_from" in r]
    assert len(resumed) == 1
    # the restarted group's first step ran within the timeout + 30 s of the stall
    assert resumed[0]["time"] - stopper.killed_at <= timeout_s + 30
    # the live rank wrote where it waited when its collective timed out; the stopped one could not
    (folder,) = (Path(cfg.run.dir) / cfg.run.name / HANGS_DIR).iterdir()
    reports = read_hang_reports(folder)
    assert reports.ranks and len(reports.missing) == 1, reports
    report = (folder / f"rank-{reports.ranks[0]:05d}.txt").read_text()
    assert "reason: a collective timed out" in report and "blocked in: torch.distributed." in report, report
