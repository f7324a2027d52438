"""A real Tune sweep over two trials on a local Ray: results files, a runnable best config, nothing left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.tune.space import load_space
from raylm.tune.sweep import sweep


def test_sweep_writes_trials_and_a_runnable_best_config(ray_cluster, small_config, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-3, 1.0e-2]}\n")
    cfg = small_config("unused", "train.eval_every=2", "tune.name=lr", "tune.num_samples=1")
    summary = sweep(cfg, space)
    sweep_dir = Path(summary["sweep_dir"])
    trials = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert sorted(t["params"]["optim.lr"] for t in trials) == [1.0e-3, 1.0e-2]
    assert all(t["error"] is None and t["value"] > 0 and t["tokens"] > 0 for t in trials)
    best = load_config(sweep_dir / "best.yaml", [])
    assert best.optim.lr == min(trials, key=lambda t: t["value"])["params"]["optim.lr"]
    assert_placement_groups_released(ray_cluster)


def assert_placement_groups_released(ray, timeout_s: float = 30.0):
    """A stopped trial's workers must give their CPUs back (Ray Train's cleaner runs within seconds)."""
    deadline = time.time() + timeout_s
    while True:
        pending = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not pending or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not pending, f"placement groups outlived the sweep: {pending}"


def test_space_errors_name_the_key_and_the_fix(small_config, tmp_path):
    cfg = small_config("unused")
    space = tmp_path / "space.yaml"
    space.write_text("optim.learning_rate: {choice: [1.0e-3]}\n")
    with pytest.raises(ConfigError, match="'optim.learning_rate' is not a config key"):
        load_space(space, cfg)
    space.write_text("train.global_batch: {choice: [8, 7]}\n")
    with pytest.raises(ConfigError, match="global_batch"):
        load_space(space, cfg)
    space.write_text("optim.lr: {normal: [0, 1]}\n")
    with pytest.raises(ConfigError, match="must be one of"):
        load_space(space, cfg)
