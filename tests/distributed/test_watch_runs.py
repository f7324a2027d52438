"""A hang on gloo ranks in plain processes (dist_runs.py): when the stop@STEP drill SIGSTOPs rank 1 of two, the
other rank writes its hang report once no step ended within fault.hang_s and ends its process, the group restarts
and the run ends as an uninterrupted one would; the driver's line names the stopped rank. (A slowed rank named as
a straggler: test_fault_runs.py's skip run; the same on Ray with the console's lines: tests/ray.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import DP2, run_losses, train_plain  # noqa: E402

from raylm.storage.file_names import HANGS_DIR  # noqa: E402
from raylm.train.fault_lines import FaultLines, read_hang_reports  # noqa: E402

# slow: a whole run that waits out fault.hang_s, then restarts its group (about 20 s on 2 idle cores, 39 s loaded)
pytestmark = [pytest.mark.runs, pytest.mark.slow]
STOPPED = ("fault.drill=stop@3", "fault.drill_rank=1", "fault.hang_s=5", "fault.max_failures=1")


def test_a_stopped_rank_is_reported_by_the_others_and_the_group_resumes(small_config, references):
    expected = references.losses(*DP2)
    cfg = small_config("stopped", *DP2, *STOPPED)
    train_plain(cfg, 2)
    run = Path(cfg.run.dir) / cfg.run.name
    assert run_losses(cfg) == expected  # restarted from the step-2 checkpoint, bit for bit

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
