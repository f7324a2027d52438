"""Elastic DP without a cluster: the dp range in the config and its one-line errors, Ray's elastic ScalingConfig,
whole-replica worker counts, and each worker group's dp."""

import subprocess
import sys

import pytest

from raylm.config import resolve, to_dict
from raylm.config.layout import dp_sizes, worker_range
from raylm.errors import ConfigError
from raylm.train.driver import scaling_for
from raylm.train.elastic import config_for_group
from raylm.train.scaling_policy import may_still_lose_a_node, whole_replicas
from tests.conftest import TINY_CONFIG
from tests.unit.test_config import error_of

ELASTIC = ["parallel.pp=2", "parallel.dp=[1, 4]", "parallel.micro_batch=2", "train.global_batch=24"]


def test_a_dp_range_is_written_as_a_list_or_as_min_and_max():
    listed = resolve({}, ELASTIC)
    keyed = resolve(
        {"parallel": {"pp": 2, "dp_min": 1, "dp_max": 4, "micro_batch": 2}, "train": {"global_batch": 24}}
    )
    assert listed == keyed
    assert (listed.parallel.dp_min, listed.parallel.dp, listed.parallel.dp_max) == (
        1,
        4,
        4,
    )  # dp starts at max
    assert list(dp_sizes(listed.parallel)) == [1, 2, 3, 4] and worker_range(listed) == (2, 8)
    assert resolve(to_dict(listed)) == listed  # what workers and checkpoints receive round-trips
    assert worker_range(resolve({}, ["parallel.pp=2", "parallel.dp=2"])) == (4, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.dp=[3, 2]"],
            "parallel.dp range [3, 2] has min 3 > max 2; write it as [min, max], e.g. parallel.dp=[2, 3]",
        ),
        (
            ["parallel.dp=[0, 2]"],
            "parallel.dp range [0, 2] has min 0 < 1: every worker group holds at least one DP "
            "replica; e.g. parallel.dp=[1, 2]",
        ),
        (
            ["parallel.dp=[2, 8]", "parallel.micro_batch=2", "train.global_batch=16"],
            "train.global_batch=16 is not divisible by parallel.micro_batch * dp = 2 * dp for dp = 3, 5, 6, 7 of "
            "parallel.dp=[2, 8]; set train.global_batch to a multiple of 1680 (micro_batch * every dp), e.g. 1680, or "
            "narrow the range",
        ),
        (
            ["parallel.dp=[1, 2, 3]"],
            "parallel.dp=[1, 2, 3] must be an integer or a range [min, max] of two integers",
        ),
        (
            ["parallel.dp=[1, 2]", "parallel.dp_max=4"],
            "parallel.dp=[min, max] and parallel.dp_min/dp_max both give a DP range; keep one",
        ),
        (
            ["parallel.dp_min=1", "parallel.dp_max=2", "parallel.dp=4"],
            "parallel.dp=4 lies outside the range parallel.dp_min..dp_max = 1..2",
        ),
        (
            ["parallel.dp=[1, 2]", "parallel.num_workers=2"],
            "parallel.num_workers=2 fixes the worker count, but "
            "parallel.dp=[1, 2] lets it change; set parallel.num_workers=0",
        ),
        (
            [
                "parallel.dp=[1, 2]",
                "schedule.batch.start=4",
                "schedule.batch.increment=8",
                "schedule.batch.ramp_tokens=99",
            ],
            "schedule.batch.start=4 must be a positive multiple of 8 "
            "(micro_batch * dp for every dp of parallel.dp=[1, 2])",
        ),
        (
            ["parallel.dp=[1, 2]", "tune.trial_of=sweep"],
            "parallel.dp=[1, 2] (elastic) is for raylm train; a sweep trial runs a fixed layout",
        ),
        (
            ["parallel.dp=[1, 2]", "fault.drill=step@2", "fault.drill_rank=1"],
            "fault.drill rank 1 (fault.drill_rank or :RANK) is not a rank of the 1 workers",
        ),
    ],
)
def test_bad_dp_ranges_are_one_line_naming_the_fix(overrides, message):
    assert message in error_of(overrides)


def test_zero_3_takes_a_dp_range_since_resizes_go_through_full_tensor_checkpoints():
    cfg = resolve({}, ["parallel.dp=[1, 2]", "parallel.zero_stage=3"])
    assert cfg.parallel.zero_stage == 3 and worker_range(cfg) == (1, 2)


def test_cli_refuses_a_bad_range_in_one_line_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "config", str(TINY_CONFIG), "parallel.dp=[4, 2]"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "parallel.dp range [4, 2] has min 4 > max 2" in lines[0]


def test_an_elastic_run_gets_rays_elastic_worker_range():
    cfg = resolve({}, [*ELASTIC, "fault.resize_check_s=5"])
    scaling, _ = scaling_for(cfg, {"CPU": 9.0})
    assert scaling.elasticity_enabled and scaling.num_workers == (2, 8)
    assert scaling.elastic_resize_monitor_interval_s == 5.0
    assert scaling.resources_per_worker == {"CPU": 1.0}  # CPUs sized for the largest group
    scaling, backend = scaling_for(cfg, {"CPU": 64.0, "GPU": 2.0})  # GPUs for the smallest group are enough
    assert scaling.use_gpu and backend == "nccl"


def test_worker_counts_are_whole_replicas_with_whole_tp_groups_per_node():
    assert whole_replicas([2, 2], tp=1, replica_workers=2, max_workers=4) == 4
    assert whole_replicas([2], tp=1, replica_workers=2, max_workers=4) == 2
    assert whole_replicas([3, 2], tp=1, replica_workers=2, max_workers=8) == 4  # 5 fit: one would be outside
    assert whole_replicas([3, 3], tp=2, replica_workers=4, max_workers=8) == 4  # 2 whole TP groups per node
    assert whole_replicas([8, 8, 8], tp=2, replica_workers=4, max_workers=16) == 16
    assert whole_replicas([1, 1], tp=2, replica_workers=2, max_workers=4) == 0  # no node holds a TP group


def test_each_worker_group_trains_with_the_dp_its_size_holds():
    cfg = resolve({}, ELASTIC)
    assert config_for_group(cfg, 6).parallel.dp == 3
    assert config_for_group(cfg, 2).parallel.dp == 1
    fixed = resolve({}, ["parallel.pp=2", "parallel.dp=2"])
    assert config_for_group(fixed, 4) is fixed
    with pytest.raises(ConfigError, match="5 workers is not a whole number of DP replicas of pp \\* tp = 2"):
        config_for_group(cfg, 5)


@pytest.mark.parametrize(
    "possible, failed_workers, failed_for_s, waits",
    [
        (
            4,
            4,
            1.0,
            True,
        ),  # all four still count a second after the failure: the lost node may not be known dead yet
        (2, 4, 1.0, False),  # the node is known dead: restart at once with what fits
        (4, 4, 8.0, False),  # past the time Ray takes to declare a node dead: a crash, not a lost node
        (4, 2, 1.0, True),  # room for more than the failed group: still wait the same short while
        (4, 4, None, False),  # no failure: the first start never waits
    ],
)
def test_a_restart_waits_only_while_ray_may_not_know_a_node_is_lost(
    possible, failed_workers, failed_for_s, waits
):
    assert may_still_lose_a_node(possible, failed_workers, failed_for_s, node_death_s=7.0) is waits
