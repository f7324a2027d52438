"""Faults inside the training loop on a real TorchTrainer (pp=1, dp=2, gloo): a NaN loss on one rank under each
fault.nonfinite policy, a loss spike, and a stalled (SIGSTOPped) rank, each checked on exact sample ids
(samples_sha) against an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import torch

from raylm.errors import RaylmError
from raylm.train.driver import train
from raylm.train.faults import SPIKE_LR_FACTOR
from raylm.train.metrics import read_metrics
from raylm.train.schedule import lr_at
from tests.ray.test_recovery import (STEPS, WorkerKiller, committed, reference, run_losses,  # noqa: F401
                                     uninterrupted)

DP2 = "parallel.dp=2"  # rank 1 computes the loss of DP replica 1
BATCH = 8  # train.global_batch of the small config


def rows_of(cfg) -> list[dict]:
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(len(rows))), "each step logged once, in order"
    return rows


def checkpoint_dir(cfg, name: str) -> Path:
    return Path(cfg.run.dir) / cfg.run.name / "checkpoints" / name


def trainer_state(cfg, name: str) -> dict:
    return json.loads((checkpoint_dir(cfg, name) / "trainer_state.json").read_text())


def assert_model_files_finite(cfg) -> None:
    for name in committed(cfg):
        for path in sorted((checkpoint_dir(cfg, name) / "model").glob("*.pt")):
            for key, tensor in torch.load(path, weights_only=True).items():
                assert torch.isfinite(tensor).all(), f"{path} {key}"


def test_nonfinite_skip_advances_the_cursor_and_logs_the_samples(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, DP2)
    cfg = small_config("nan-skip", *STEPS, DP2, "fault.drill=nonfinite@3", "fault.drill_rank=1")
    assert cfg.fault.nonfinite == "skip"  # the default
    train(cfg)
    rows = rows_of(cfg)
    assert len(rows) == cfg.train.max_steps
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]  # the same samples, step by step
    assert [r["loss"] for r in rows[:3]] == [loss for loss, _ in expected[:3]]
    assert rows[3]["loss"] is None
    assert rows[3]["skipped"] == {"reason": "nonfinite", "samples": [3 * BATCH, 4 * BATCH], "loss_ranks": [1],
                                  "grad_ranks": [0, 1]}
    assert all("skipped" not in r and r["loss"] is not None for r in rows[4:])
    assert rows[4]["loss"] != expected[4][0]  # trained on without step 3's update
    last = json.loads((checkpoint_dir(cfg, committed(cfg)[-1]) / "engine.json").read_text())
    assert (last["adam_step"], last["skipped_steps"]) == (cfg.train.max_steps - 1, 1)
    assert_model_files_finite(cfg)


def test_nonfinite_stop_names_step_and_rank_and_commits_nothing_from_it(ray_cluster, small_config):
    cfg = small_config("nan-stop", *STEPS, DP2, "fault.drill=nonfinite@3", "fault.drill_rank=1",
                       "fault.nonfinite=stop", "fault.max_failures=1")
    with pytest.raises(RaylmError, match=r"step 3: the loss is not finite on rank 1.*fault.nonfinite=stop") as info:
        train(cfg)
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert committed(cfg) == ["step-00000002"]  # none at or after the bad step
    rows = rows_of(cfg)
    assert len(rows) == 3 and not any("resumed_from" in r for r in rows)  # a user error: not retried


def test_nonfinite_rollback_skips_the_window_and_records_it(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, DP2)
    cfg = small_config("nan-rollback", *STEPS, DP2, "checkpoint.every_steps=4", "checkpoint.keep=3",
                       "fault.drill=nonfinite@5", "fault.drill_rank=1", "fault.nonfinite=rollback")
    train(cfg)
    rows = rows_of(cfg)
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]
    assert [r["loss"] for r in rows[:5]] == [loss for loss, _ in expected[:5]]
    window = {"step": 5, "to_step": 4, "samples": [4 * BATCH, 6 * BATCH]}  # steps 4 and 5 are never trained on
    assert rows[5]["rollback"] == window and rows[5]["nonfinite"]["loss_ranks"] == [1]
    # committed at once (step 6 is no checkpoint.every_steps step), so a restart resumes past the window too
    assert committed(cfg) == ["step-00000004", "step-00000006", "step-00000008"]
    state = trainer_state(cfg, "step-00000006")
    assert state["samples"] == 6 * BATCH and state["rolled_back"] == [window]
    assert_model_files_finite(cfg)


@pytest.mark.slow
def test_spike_warns_then_rolls_back(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, DP2)
    spike = ("fault.drill=spike@5", "fault.spike_window=4", "fault.spike_sigma=3", "checkpoint.every_steps=4")
    warned = small_config("spike-warn", *STEPS, DP2, *spike)
    train(warned)
    rows = rows_of(warned)
    c = warned
    assert rows[5]["lr"] == lr_at(5, c.optim.lr, c.train.max_steps, c.schedule.lr, 1.0) * SPIKE_LR_FACTOR
    # step 5's update shows in step 6's loss; the loss stays far above the window, which keeps spikes out
    assert [r["step"] for r in rows if "spike" in r] == [6, 7]
    assert rows[6]["spike"]["samples"] == [6 * BATCH, 7 * BATCH] and rows[6]["spike"]["action"] == "warn"
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]
    rolled = small_config("spike-rollback", *STEPS, DP2, *spike, "fault.spike=rollback")
    train(rolled)
    rows = rows_of(rolled)
    assert rows[6]["rollback"] == {"step": 6, "to_step": 4, "samples": [4 * BATCH, 7 * BATCH]}
    assert rows[7]["loss"] < rows[6]["loss"] / 2  # back on the checkpoint's weights
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]


@pytest.mark.slow
def test_stalled_rank_fails_its_collectives_and_the_group_resumes_bitwise(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, DP2)
    timeout_s = 20
    cfg = small_config("stalled", *STEPS, DP2, f"fault.collective_timeout_s={timeout_s}", "fault.max_failures=1")
    stopper = WorkerKiller(cfg, steps=3, signum=signal.SIGSTOP)  # it holds its sockets open: no peer sees it die
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
