"""Stragglers and hangs on gloo ranks in plain processes (dist_runs.py), in one two-rank run: rank 1, slowed by the
slow@STEP drill, is the slowest rank in the metrics and named as a straggler (once per worker group); when the
stop@STEP drill SIGSTOPs it, the other rank writes its hang report once no step ended within fault.hang_s, the group
restarts and the run ends as an uninterrupted one would; the driver's line names the stopped rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import DP2, run_losses, train_plain  # noqa: E402

from raylm.storage.file_names import HANGS_DIR  # noqa: E402
from raylm.train.fault_lines import FaultLines, read_hang_reports  # noqa: E402
from raylm.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.runs
WATCHED = (
    "fault.drill=slow@0,stop@3",  # rank 1 sleeps 0.5 s after every step, and stops after step 3
    "fault.drill_rank=1",
    "fault.hang_s=5",
    "fault.max_failures=1",
    "fault.straggler_factor=1.2",  # two ranks: the median is their mean
    "fault.straggler_steps=2",
    "train.report_every=2",
)


def test_a_slowed_rank_is_named_and_a_stopped_one_reported_by_the_others(small_config, references):
    expected = references.losses(*DP2)
    cfg = small_config("watched", *DP2, *WATCHED)
    train_plain(cfg, 2)
    run = Path(cfg.run.dir) / cfg.run.name
    assert run_losses(cfg) == expected  # restarted from the step-2 checkpoint, bit for bit

    rows = read_metrics(run)
    reported = [r for r in rows if "slowest_rank" in r]
    assert [r["step"] + 1 for r in reported] == [2, 4, 6, 8]  # every train.report_every steps
    assert all(r["slowest_rank"] == 1 and r["slowest_rank_s"] > r["median_rank_s"] for r in reported), (
        reported
    )
    named = [
        r["straggler"] for r in rows if "straggler" in r
    ]  # once per worker group: before and after the stop
    assert [n["rank"] for n in named] == [1, 1] and all(n["steps"] >= 2 for n in named), named

    (folder,) = (run / HANGS_DIR).iterdir()
    reports = read_hang_reports(folder)
    assert reports.ranks == [0] and reports.missing == [1]
    text = (folder / "rank-00000.txt").read_text()
    assert "no step ended within fault.hang_s=5 s" in text
    assert "blocked in: torch.distributed." in text and "with ranks [" in text
    assert " in train\n" in text  # the loop's frame, from faulthandler's stacks
    line = FaultLines(run, since=0).line({}, failure=1, max_failures=1)
    assert (
        line.startswith("rank 1 on node ")
        and " did not arrive (no step ended within fault.hang_s=5 s" in line
    )
    assert line.endswith(f"their stacks: {folder}); restarting from step 8, failure 1 of 1"), line
