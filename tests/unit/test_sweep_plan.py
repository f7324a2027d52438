"""A sweep's token arithmetic: budget -> max_steps per batch schedule, rung milestones, the step each rung lands on."""

import pytest

from raylm.config import resolve
from raylm.config.schema import BatchScheduleConfig
from raylm.errors import ConfigError
from raylm.train.schedule import milestone_crossed
from raylm.tune.budget import budget_tokens, rung_milestones, steps_for_tokens, tokens_after_steps
from raylm.tune.plan import best_config, plan_sweep, trial_config
from raylm.tune.space import Space

SEQ = 128
RAMP = BatchScheduleConfig(start=8, increment=8, ramp_tokens=8192)  # to 24: 4 steps of 8, 2 of 16, then 24


def base(*overrides):
    return resolve(
        {},
        [
            "data.seq_len=128",
            "train.max_steps=60",
            "train.global_batch=16",
            "parallel.micro_batch=4",
            "train.eval_batches=4",
            "train.eval_every=10",
            *overrides,
        ],
    )


def test_budget_defaults_to_the_base_run():
    assert budget_tokens(base()) == 60 * 16 * SEQ
    assert budget_tokens(base("tune.budget_tokens=5000")) == 5000


@pytest.mark.parametrize(
    "final_batch, ramp, budget, steps",
    [
        (8, BatchScheduleConfig(), 122880, 120),
        (16, BatchScheduleConfig(), 122880, 60),
        (16, BatchScheduleConfig(), 122881, 61),
        (32, BatchScheduleConfig(), 122880, 30),
        (24, RAMP, 8192, 6),
        (24, RAMP, 8193, 7),
        (24, RAMP, 8192 + 3 * 24 * SEQ, 9),
    ],
)
def test_max_steps_walks_the_batch_schedule(final_batch, ramp, budget, steps):
    assert steps_for_tokens(budget, final_batch, ramp, SEQ) == steps
    trained = tokens_after_steps(steps, final_batch, ramp, SEQ)
    last_step_tokens = trained - tokens_after_steps(steps - 1, final_batch, ramp, SEQ)
    assert budget <= trained < budget + last_step_tokens  # the budget, overshot by less than one step


def test_rungs_at_grace_times_rf_powers():
    assert rung_milestones(base(), 122880) == [13654, 40960]
    assert rung_milestones(base("tune.grace_tokens=1000", "tune.reduction_factor=2"), 5000) == [
        1000,
        2000,
        4000,
    ]
    with pytest.raises(
        ConfigError, match=r"budget of 1000 tokens is not above its grace period of 2000 tokens"
    ):
        rung_milestones(base("tune.grace_tokens=2000"), 1000)


@pytest.mark.parametrize(
    "final_batch, ramp, milestone, step",
    [
        (8, BatchScheduleConfig(), 13654, 14),
        (16, BatchScheduleConfig(), 13654, 7),
        (8, BatchScheduleConfig(), 40960, 40),
        (16, BatchScheduleConfig(), 40960, 20),
        (24, RAMP, 5000, 5),  # 4 steps of 8 (4096 tokens), then 16: 6144 at step 5
    ],
)
def test_the_rung_step_is_the_first_step_at_or_past_the_milestone(final_batch, ramp, milestone, step):
    crossed = [
        s
        for s in range(1, 200)
        if milestone_crossed(
            tokens_after_steps(s - 1, final_batch, ramp, SEQ),
            tokens_after_steps(s, final_batch, ramp, SEQ),
            [milestone],
        )
    ]
    assert crossed == [step]


def test_trial_configs_share_the_budget_and_the_validation_samples():
    cfg = base()
    plan = plan_sweep(cfg, Space(path="s", raw={}, params=[]))
    t8 = trial_config(cfg, {"train.global_batch": 8}, plan, "/tmp/trials", "t8")
    t16 = trial_config(cfg, {"train.global_batch": 16}, plan, "/tmp/trials", "t16")
    assert (t8.train.max_steps, t16.train.max_steps) == (120, 60)
    assert t8.train.eval_samples == t16.train.eval_samples == 64  # the base's 4 batches of 16
    assert t8.tune.rung_tokens == [13654, 40960] and t8.tune.trial_of == "sweep"
    best = best_config(t8, cfg)
    assert best.train.max_steps == 120 and best.tune.trial_of == "" and best.run.name == "sweep-best"


def test_searching_the_ramp_start_alone_gets_ramp_defaults():
    cfg = base()
    plan = plan_sweep(cfg, Space(path="s", raw={}, params=[]))
    trial = trial_config(cfg, {"schedule.batch.start": 8}, plan, "/tmp/trials", "r")
    assert trial.schedule.batch.increment == 4 and trial.schedule.batch.ramp_tokens == 60 * 16 * SEQ // 4
