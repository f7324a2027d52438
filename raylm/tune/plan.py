"""What every trial of a sweep shares (token budget, rungs, validation samples) and each trial's own run config."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from raylm.config import Config, with_overrides
from raylm.config.derived import eval_samples, samples_per_micro_step
from raylm.errors import ConfigError
from raylm.tune.budget import budget_tokens, rung_milestones, trial_max_steps
from raylm.tune.space import Space, active_params

MAX_COMBINATIONS = 10_000  # choice/grid values x range ends checked together before Ray starts


@dataclass(frozen=True)
class SweepPlan:
    """Fixed for the whole sweep: every trial trains `budget_tokens`, is judged at `milestones_tokens` and
    evaluates on the same `eval_samples` validation samples."""

    name: str
    budget_tokens: int
    milestones_tokens: list[int]
    eval_samples: int
    space_raw: dict
    cpus_per_worker: float = 0.0  # set once the cluster is known (raylm.tune.resources)
    torch_threads: int = 0
    in_trial_actor: bool = False  # every trial trains in its Tune actor (raylm.tune.trial_actor)


def plan_sweep(cfg: Config, space: Space) -> SweepPlan:
    budget = budget_tokens(cfg)
    return SweepPlan(
        name=cfg.tune.name,
        budget_tokens=budget,
        milestones_tokens=rung_milestones(cfg, budget),
        eval_samples=eval_samples(cfg),
        space_raw=space.raw,
    )


def trial_overrides(base: Config, params: dict[str, Any], plan: SweepPlan) -> dict[str, Any]:
    """The sampled values that apply, plus ramp defaults when the space turns a ramp on that the base lacks."""
    overrides = active_params(plan.space_raw, params)
    if overrides.get("schedule.batch.start"):
        step = samples_per_micro_step(base)
        overrides.setdefault("schedule.batch.increment", base.schedule.batch.increment or step)
        overrides.setdefault(
            "schedule.batch.ramp_tokens", base.schedule.batch.ramp_tokens or plan.budget_tokens // 4
        )
    return overrides


def trial_config(
    base: Config,
    params: dict[str, Any],
    plan: SweepPlan,
    run_dir: str,
    trial_name: str,
    start: tuple[int, int] = (0, 0),
) -> Config:
    """A trial's run: the base with its values, max_steps walked from the budget (from `start` = (steps, tokens)
    after a PBT exploit), rung reports, fixed eval samples."""
    cfg = with_overrides(base, trial_overrides(base, params, plan))
    max_steps = trial_max_steps(cfg, plan.budget_tokens, start)
    return with_overrides(
        cfg,
        {
            "train.max_steps": max_steps,
            "train.eval_samples": plan.eval_samples,
            "train.report_every": max_steps,
            "checkpoint.resume": "auto",
            "fault.max_failures": max(base.fault.max_failures, base.tune.max_failures),
            "tune.trial_of": plan.name,
            "tune.rung_tokens": plan.milestones_tokens,
            "run.dir": run_dir,
            "run.name": trial_name,
            "parallel.cpus_per_worker": plan.cpus_per_worker or base.parallel.cpus_per_worker,
            "train.torch_threads": plan.torch_threads or base.train.torch_threads,
        },
    )


def best_config(trial_cfg: Config, base: Config) -> Config:
    """A trial's config as a plain `raylm train` run from scratch: max_steps walked from the budget with its batch
    schedule (a PBT trial's own count included the donor's steps), the sweep's bookkeeping cleared."""
    return with_overrides(
        trial_cfg,
        {
            "train.max_steps": trial_max_steps(trial_cfg, budget_tokens(base)),
            "tune.start_from": "",
            "tune.parent_run": "",
            "run.dir": base.run.dir,
            "run.name": f"{base.tune.name}-best",
            "tune.trial_of": "",
            "tune.rung_tokens": [],
            "train.report_every": base.train.report_every,
            "parallel.cpus_per_worker": base.parallel.cpus_per_worker,
            "train.torch_threads": base.train.torch_threads,
            "fault.max_failures": base.fault.max_failures,
            "checkpoint.resume": base.checkpoint.resume,
        },
    )


def check_combinations(base: Config, space: Space, plan: SweepPlan) -> int:
    """Every choice/grid value with every range end, together, must make a valid trial (up to MAX_COMBINATIONS);
    a failure names the fewest keys and values that fail. Returns the number of combinations checked."""
    keys = [p.key for p in space.params]
    values = [p.ends() for p in space.params]
    for key, options in zip(keys, values, strict=True):  # one key at a time first: the shortest message
        for value in options:
            _check_one(base, {key: value}, plan)
    checked = 0
    for combo in itertools.islice(itertools.product(*values), MAX_COMBINATIONS):
        params = dict(zip(keys, combo, strict=True))
        if _failure(base, params, plan):
            pairs = (dict(pair) for pair in itertools.combinations(params.items(), 2))
            culprit = next((pair for pair in pairs if _failure(base, pair, plan)), params)
            shown = ", ".join(
                f"{key}={value}" for key, value in active_params(plan.space_raw, culprit).items()
            )
            raise ConfigError(f"the space's combination {shown} fails: {_failure(base, culprit, plan)}")
        checked += 1
    return checked


def _check_one(base: Config, params: dict[str, Any], plan: SweepPlan) -> None:
    message = _failure(base, params, plan)
    if message:
        key, value = next(iter(params.items()))
        raise ConfigError(f"the space's value {key}={value} fails: {message}")


def _failure(base: Config, params: dict[str, Any], plan: SweepPlan) -> str | None:
    """The validation message of the trial these values make, or None when it is valid."""
    try:
        trial_config(base, params, plan, base.run.dir, "check")
    except ConfigError as exc:
        return str(exc)
    return None
