"""The console of `raylm train` as a user's shell sees it (stdout and stderr into pipes, not a terminal), on its own
local Ray: a pp=2 tp=2 run of 20 steps with a worker killed, restarted by Ray Train; then its resume under another
layout (pp=1 dp=2), in which a rank stops (SIGSTOP) and the group restarts once no step ended within
fault.hang_s. Every line is raylm's own (raylm.log.CONSOLE_LINE), with no colour codes; each fault gets one line
naming the rank and its node; the 20-step run prints at most 25 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.log import CONSOLE_LINE
from raylm.storage.file_names import HANGS_DIR
from tests.ray.test_interrupt import start_cli_run

pytestmark = pytest.mark.slow  # two CLI runs with a local Ray each: about 5 minutes on 2 cores
RUN = ("train.eval_every=10", "train.report_every=5", "checkpoint.every_steps=5", "checkpoint.keep=2")


def console_of(cfg, tmp_path: Path) -> list[str]:
    """Every line the run printed, stdout's and stderr's; the run must succeed."""
    proc = start_cli_run(cfg, tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    print(err + out)  # shown with `pytest -s`: the console as the user saw it
    return out.splitlines() + err.splitlines()


def test_every_console_line_is_raylms(ray_cluster, small_config, tmp_path):
    killed = small_config(
        "console",
        *RUN,
        "parallel.pp=2",
        "parallel.tp=2",
        "train.max_steps=20",
        "fault.drill=step@7",
        "fault.drill_rank=1",
        "fault.max_failures=1",
    )
    lines = console_of(killed, tmp_path)
    assert [line for line in lines if not CONSOLE_LINE.match(line)] == [], lines
    assert len(lines) <= 25 and not any("\x1b[" in line for line in lines), lines
    faults = [line for line in lines if " died (" in line]
    assert len(faults) == 1 and faults[0].startswith("[raylm r0] rank 1 on node "), lines
    assert faults[0].endswith("; restarting from step 5, failure 1 of 1"), faults

    resumed = small_config(
        "console",
        *RUN,
        "parallel.dp=2",
        "train.max_steps=30",
        "fault.drill=stop@24",
        "fault.drill_rank=1",
        "fault.hang_s=15",
        "fault.max_failures=1",
    )
    lines = console_of(resumed, tmp_path)
    assert [line for line in lines if not CONSOLE_LINE.match(line)] == [], lines
    assert any("resharding model and optimizer state to (pp=1, tp=1, dp=2)" in line for line in lines), lines
    (folder,) = (Path(resumed.run.dir) / resumed.run.name / HANGS_DIR).iterdir()
    hangs = [line for line in lines if " did not arrive (" in line]
    assert len(hangs) == 1 and hangs[0].startswith("[raylm r0] rank 1 on node "), lines
    assert f"their stacks: {folder}); restarting from step 20, failure 1 of 1" in hangs[0], hangs
