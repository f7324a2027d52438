"""An engine holds one process group per single rank (raylm's and DeepSpeed's alike), so a gloo rank runs one event
loop thread for all of them instead of one per group (each wakes every 10 ms), and groups of several ranks stay
their own; every group the engine creates has fault.collective_timeout_s."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_groups import engine_groups  # noqa: E402
from dist_harness import run_world  # noqa: E402


def test_one_rank_world_trains_on_the_default_group_alone():
    (rank0,) = run_world(1, engine_groups, [(1, 1, 1)])
    (built,) = rank0
    assert all(built["world"].values()), built["world"]  # tp, dp, pp and DeepSpeed's slice group
    before, after = built["loop_threads"]
    assert before == after == 1  # the default group's; seven single-rank groups used to add seven more


def test_single_rank_groups_are_shared_and_larger_groups_kept():
    per_rank = run_world(2, engine_groups, [(2, 1, 1), (1, 2, 1)], ("fault.collective_timeout_s=77",))
    for rank_out in per_rank:
        pipeline, tensor = rank_out
        assert pipeline["sizes"] == {"tp": 1, "dp": 1, "pp": 2, "ds_slice": 1}
        assert pipeline["same"]["tp"] == ["tp", "dp", "ds_slice"]  # one group for the rank alone
        assert not pipeline["world"]["pp"]  # a group of two ranks is its own, never the default group
        assert tensor["sizes"] == {"tp": 2, "dp": 1, "pp": 1, "ds_slice": 2}
        assert tensor["same"]["dp"] == ["dp", "pp"]
        assert tensor["same"]["tp"] == ["tp"]
        assert pipeline["loss"] == per_rank[0][0]["loss"] and tensor["loss"] == per_rank[0][1]["loss"]
        for (
            built
        ) in rank_out:  # the harness made the default group with DeepSpeed's timeout; the engine its own
            timeouts = dict(built["timeouts_s"])
            assert timeouts.pop("world") == 600.0  # deepspeed.init_distributed's default
            assert len(timeouts) >= 2 and set(timeouts.values()) == {77.0}, built["timeouts_s"]
