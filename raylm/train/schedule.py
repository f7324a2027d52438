"""Schedules as pure functions of the step: learning rate (constant, linear, cosine, wsd) and batch-size ramp."""

from __future__ import annotations

import math

from raylm.config.schema import BatchScheduleConfig, LrScheduleConfig


def lr_at(step: int, peak_lr: float, max_steps: int, sched: LrScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay to the floor."""
    floor = peak_lr * sched.min_lr_frac
    if step < sched.warmup_steps:
        return peak_lr * (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return peak_lr
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
