"""Schedules as pure functions of the step: learning rate (constant, linear, cosine, wsd, plateau), batch-size
ramp, sequence-length warm-up, and the token milestones (a sweep's rungs) a step crosses."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from raylm.config.schema import BatchScheduleConfig, LrScheduleConfig, SeqLenScheduleConfig


def lr_at(
    step: int, peak_lr: float, max_steps: int, sched: LrScheduleConfig, plateau_scale: float = 1.0
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay to the floor.

    `plateau` holds peak_lr * plateau_scale after warmup; the scale comes from plateau_after_eval."""
    floor = peak_lr * sched.min_lr_frac
    if step < sched.warmup_steps:
        return peak_lr * (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return peak_lr
    if sched.kind == "plateau":
        return peak_lr * plateau_scale
    decay_steps = max(1, max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / decay_steps)
    if sched.kind == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    if sched.kind == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched.kind == "wsd":
        return _wsd(step, peak_lr, floor, max_steps, sched)
    raise ValueError(f"unknown schedule.lr.kind {sched.kind!r}")


def _wsd(step: int, peak_lr: float, floor: float, max_steps: int, sched: LrScheduleConfig) -> float:
    """Warmup-stable-decay: hold the peak, then decay over the last `decay_frac` of the steps."""
    decay_steps = max(1, round(max_steps * sched.decay_frac))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    shape = {
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        "sqrt": 1.0 - math.sqrt(progress),
    }[sched.decay_shape]
    return floor + (peak_lr - floor) * shape


def batch_size_at(tokens_seen: int, final_batch: int, sched: BatchScheduleConfig) -> int:
    """Global batch (samples) once `tokens_seen` tokens are trained: grows by `increment` in equal token stages."""
    if not sched.start or sched.start >= final_batch:
        return final_batch
    stages = -(-(final_batch - sched.start) // sched.increment)  # number of increments to reach the end
    tokens_per_stage = sched.ramp_tokens / stages
    stage = int(tokens_seen // tokens_per_stage)
    return min(final_batch, sched.start + stage * sched.increment)


def seq_len_at(step: int, final_seq_len: int, sched: SeqLenScheduleConfig) -> int:
    """Window length of optimizer step `step` (0-based): `start`, doubled at equal step intervals up to
    final_seq_len (data.seq_len), which it reaches at step `warmup_steps`. With start = final / 2^k the k
    doublings fall at steps ceil(i * warmup_steps / k), i = 1..k."""
    if not sched.start or sched.start >= final_seq_len:
        return final_seq_len
    doublings = (final_seq_len // sched.start).bit_length() - 1
    stage = min(doublings, step * doublings // sched.warmup_steps)
    return sched.start << stage


@dataclass(frozen=True)
class PlateauState:
    """The plateau schedule's memory: the lr scale, the best val_loss after warmup, evaluations since it improved.
    It is saved in the checkpoint's trainer state, so a resumed run (any layout) cuts the lr at the same steps."""

    scale: float = 1.0
    best_loss: float | None = None
    stalled_evals: int = 0


def plateau_after_eval(
    state: PlateauState, val_loss: float, step: int, sched: LrScheduleConfig
) -> PlateauState:
    """Update after an evaluation at optimizer step count `step`: an improvement is a drop below best * (1 -
    threshold); `patience` evaluations without one multiply the scale by `factor`, down to min_lr_frac. Every rank
    sees the same val_loss (evaluations are collective), so every rank takes the same decision."""
    if sched.kind != "plateau" or step <= sched.warmup_steps:
        return state
    finite = math.isfinite(val_loss)
    if finite and (state.best_loss is None or val_loss < state.best_loss * (1.0 - sched.threshold)):
        return replace(state, best_loss=val_loss, stalled_evals=0)
    stalled = state.stalled_evals + 1
    if stalled < sched.patience:
        return replace(state, stalled_evals=stalled)
    return replace(state, scale=max(sched.min_lr_frac, state.scale * sched.factor), stalled_evals=0)


def milestone_crossed(tokens_before: int, tokens_after: int, milestones_tokens: list[int]) -> int | None:
    """The milestone a step from `tokens_before` to `tokens_after` reaches first (before < M <= after), if any:
    a trial evaluates and reports there, so every trial is judged within one step of the same tokens."""
    crossed = [m for m in milestones_tokens if tokens_before < m <= tokens_after]
    return max(crossed) if crossed else None
