"""A sweep's token arithmetic: the budget, each trial's max_steps walked from its batch schedule, the rungs."""

from __future__ import annotations

import math

from raylm.config import Config
from raylm.config.schema import BatchScheduleConfig
from raylm.errors import ConfigError
from raylm.train.schedule import batch_size_at


def budget_tokens(cfg: Config) -> int:
    """tune.budget_tokens, or what the base config trains: max_steps * global_batch * seq_len."""
    return cfg.tune.budget_tokens or cfg.train.max_steps * cfg.train.global_batch * cfg.data.seq_len


def tokens_after_steps(steps: int, final_batch: int, ramp: BatchScheduleConfig, seq_len: int) -> int:
    """Tokens trained after `steps` optimizer steps, walking the batch schedule as the training loop does."""
    tokens = 0
    for _ in range(steps):
        tokens += batch_size_at(tokens, final_batch, ramp) * seq_len
    return tokens


def steps_for_tokens(
    target_tokens: int, final_batch: int, ramp: BatchScheduleConfig, seq_len: int, start_tokens: int = 0
) -> int:
    """The first step count (after `start_tokens`) whose tokens reach `target_tokens`: the trial overshoots by less
    than one step."""
    steps, tokens = 0, start_tokens
    while tokens < target_tokens:
        tokens += batch_size_at(tokens, final_batch, ramp) * seq_len
        steps += 1
    return steps


def trial_max_steps(cfg: Config, budget: int, start: tuple[int, int] = (0, 0)) -> int:
    """A trial's train.max_steps: the steps its own batch schedule needs to train the budget; from a checkpoint at
    `start` = (steps, tokens) (a PBT exploit), those steps plus what its schedule needs from there."""
    steps, tokens = start
    return steps + steps_for_tokens(
        budget, cfg.train.global_batch, cfg.schedule.batch, cfg.data.seq_len, tokens
    )


def rung_milestones(cfg: Config, budget: int) -> list[int]:
    """Milestones M_k = grace * rf^k below the budget, rounded up to whole tokens (grace defaults to budget / 9,
    rf to 3: rungs at 1/9 and 1/3 of the budget)."""
    grace = cfg.tune.grace_tokens or budget / 9
    if grace >= budget:
        raise ConfigError(
            f"the sweep's budget of {budget} tokens is not above its grace period of {grace:.0f} tokens "
            f"(tune.grace_tokens); raise tune.budget_tokens or lower tune.grace_tokens"
        )
    milestones, k = [], 0
    while grace * cfg.tune.reduction_factor**k < budget * (1 - 1e-9):
        milestones.append(math.ceil(grace * cfg.tune.reduction_factor**k - 1e-6))
        k += 1
    return milestones
