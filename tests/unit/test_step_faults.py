"""The decisions behind fault.nonfinite and fault.spike: per-rank flags read as one verdict, the rolling loss
window, what each policy does to a step's row, the finite check on save, the drills and the config keys."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from raylm.checkpoint.finite import first_non_finite
from raylm.config import resolve
from raylm.errors import ConfigError, RaylmError
from raylm.parallel.step_guard import GRAD, LOSS
from raylm.train.anomaly import NonFinite, RollingLoss
from raylm.train.faults import FIRED_MARKER, SPIKE_LR_FACTOR, FaultDrill
from raylm.train.step import TrainState
from raylm.train.step_faults import StepFaults


def test_flags_from_every_rank_read_as_one_verdict():
    assert NonFinite.from_flags(3, [0, 0, 0, 0]) is None
    bad = NonFinite.from_flags(3, [GRAD, LOSS | GRAD, 0, GRAD])
    assert bad == NonFinite(step=3, loss_ranks=(1,), grad_ranks=(0, 1, 3))
    assert bad.describe() == "step 3: the loss is not finite on rank 1, gradients on ranks 0, 1, 3 too"
    only_grads = NonFinite.from_flags(5, [GRAD, GRAD])
    assert only_grads.describe() == "step 5: the gradient norm is not finite on ranks 0, 1"


def test_rolling_window_flags_a_spike_only_once_full_and_keeps_it_out():
    rolling = RollingLoss(window=4, sigma=3.0)
    assert [rolling.check(x) for x in (5.0, 4.0, 100.0, 4.5)] == [None] * 4  # not full yet: no judgement
    mean = (5.0 + 4.0 + 100.0 + 4.5) / 4
    assert rolling.check(mean) is None  # in the window, which now drops the oldest (5.0)
    history = [4.0, 4.2, 3.8, 4.0]
    std = math.sqrt(sum((x - 4.0) ** 2 for x in history) / 4)
    assert RollingLoss(window=4, sigma=3.0, history=history).check(4.0 + 3.0 * std - 1e-9) is None
    rolling = RollingLoss(window=4, sigma=3.0, history=history)
    spike = rolling.check(4.0 + 3.0 * std + 1e-9)
    assert spike is not None and spike.mean == pytest.approx(4.0) and spike.std == pytest.approx(std)
    assert rolling.check(9.0) is not None
    assert 9.0 not in rolling.history()  # a spike does not widen the window it is judged against
    assert rolling.check(float("nan")) is None and len(rolling.history()) == 4


def test_flat_losses_use_a_floor_on_the_deviation_and_sigma_zero_is_off():
    flat = [2.0, 2.0, 2.0]
    assert (
        RollingLoss(window=3, sigma=6.0, history=flat).check(2.0 * (1 + 6 * 0.01) - 1e-6) is None
    )  # 1% floor
    assert RollingLoss(window=3, sigma=6.0, history=flat).check(2.0 * (1 + 6 * 0.01) + 1e-6) is not None
    assert RollingLoss(window=3, sigma=0.0, history=[2.0, 2.0, 2.0]).check(1e9) is None


class FlagsOnly:
    """The one engine call StepFaults makes for a step: the step guard's flags."""

    def __init__(self, flags):
        self.flags = flags

    def take_nonfinite_flags(self):
        return self.flags


def judge(policy: str, flags, loss: float = float("nan"), *overrides: str):
    cfg = resolve({}, [f"fault.nonfinite={policy}", *overrides])
    row = {"step": 7, "loss": loss}
    faults = StepFaults(cfg, FlagsOnly(flags), None)
    return faults.judge(row, TrainState(7, 7 * 512, 56), TrainState(8, 8 * 512, 64)), row


def test_each_nonfinite_policy():
    with pytest.raises(
        RaylmError, match=r"^step 7: the loss is not finite on rank 1, .*fault.nonfinite=stop"
    ):
        judge("stop", [GRAD, LOSS | GRAD])
    rollback, row = judge("skip", [GRAD, LOSS | GRAD])
    assert not rollback and row["loss"] is None
    assert row["skipped"] == {
        "reason": "nonfinite",
        "samples": [56, 64],
        "loss_ranks": [1],
        "grad_ranks": [0, 1],
    }
    rollback, row = judge("rollback", [0, LOSS])
    assert rollback and row["nonfinite"]["samples"] == [56, 64] and "skipped" not in row
    rollback, row = judge("stop", [0, LOSS], float("nan"), "tune.trial_of=sweep")
    assert not rollback and math.isnan(row["loss"])  # a sweep trial ends as diverged instead


def test_spike_rows_and_the_window_travels_in_checkpoints():
    cfg = resolve({}, ["fault.spike_window=3", "fault.spike=rollback"])
    faults = StepFaults(cfg, FlagsOnly(None), {"loss_window": [3.0, 3.1, 2.9]})
    row = {"step": 7, "loss": 30.0}
    assert faults.judge(row, TrainState(7, 0, 56), TrainState(8, 0, 64))
    assert row["spike"]["samples"] == [56, 64] and row["spike"]["action"] == "rollback"
    assert faults.state_dict() == {"loss_window": [3.0, 3.1, 2.9], "rolled_back": []}
    warn = StepFaults(
        resolve({}, ["fault.spike_window=3"]), FlagsOnly(None), {"loss_window": [3.0, 3.1, 2.9]}
    )
    assert not warn.judge({"step": 7, "loss": 30.0}, TrainState(), TrainState(1, 0, 8))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_first_non_finite_names_the_tensor(value):
    assert first_non_finite({"a": torch.ones(3), "empty": torch.ones(0)}) is None
    bad = torch.ones(2, 2)
    bad[0, 1] = value
    assert (
        first_non_finite({"a": torch.ones(3), "layers.0.w": bad}) == "layers.0.w (1 of 4 values are nan/inf)"
    )
    long = torch.randn(100_003)  # past the vectorized chunks, with the bad value in the tail
    long[100_001] = value
    assert first_non_finite({"w": long}) == "w (1 of 100003 values are nan/inf)"


def test_spike_drill_fires_on_every_rank_once_per_run(tmp_path):
    cfg = resolve({}, ["fault.drill=spike@4", "fault.drill_rank=0", "parallel.dp=2"])
    drills = [FaultDrill(cfg, tmp_path, rank) for rank in (0, 1)]
    assert [d.lr_factor(3) for d in drills] == [1.0, 1.0]
    assert [d.lr_factor(4) for d in drills] == [SPIKE_LR_FACTOR] * 2
    assert (tmp_path / FIRED_MARKER).read_text() == "spike@4\n"
    assert FaultDrill(cfg, tmp_path, 1).lr_factor(4) == 1.0  # a restarted group does not fire it again


@pytest.mark.parametrize(
    "override, message",
    [
        ("fault.nonfinite=ignore", "fault.nonfinite='ignore' is not one of stop, skip, rollback"),
        ("fault.spike=stop", "fault.spike='stop' is not one of warn, rollback"),
        ("fault.spike_window=0", "fault.spike_window=0 must be positive"),
        ("fault.collective_timeout_s=0", "fault.collective_timeout_s=0 must be positive"),
        ("fault.spike_sigma=-1", "fault.spike_sigma=-1.0 must not be negative"),
        ("fault.drill=nan@3", "fault.drill='nan@3' is not PHASE@STEP"),
    ],
)
def test_fault_keys_are_validated_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        resolve({}, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults():
    fault = resolve({}).fault
    assert (fault.nonfinite, fault.spike, fault.spike_sigma, fault.spike_window) == ("skip", "warn", 6.0, 50)
    assert resolve({}, ["fault.drill=nonfinite@3"]).fault.drill == "nonfinite@3"


def test_a_default_group_created_by_raylm_gets_the_collective_timeout(monkeypatch):
    import deepspeed

    from raylm.parallel.engine import init_distributed

    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("LOCAL_RANK", "0")
    init_distributed("gloo", 77)
    init_distributed("gloo")
    assert calls == [{"dist_backend": "gloo", "timeout": timedelta(seconds=77)}, {"dist_backend": "gloo"}]
