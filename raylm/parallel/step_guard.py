"""The check before every optimizer step: is any rank's loss or gradient non-finite? Every rank decides together.

Each rank sets its own slot of a world-size int vector (bit LOSS: a micro-batch loss it computed was not finite;
bit GRAD: a gradient it holds for the step is not finite), and one all-reduce (SUM) over the whole world gives
every rank every rank's flags before any of them steps. A dedicated collective, not a reused one: DeepSpeed's own
gradient-norm reduction runs inside the optimizer step (too late to skip it, and not under ZeRO 0 without
clipping) and spans the model-parallel and DP groups, while the pipeline's loss broadcast comes after the step.
One 4-byte-per-rank all-reduce per step costs one collective latency.

A flagged step is skipped on every rank through each DeepSpeed optimizer's own overflow path (the one fp16 loss
scaling uses), so DeepSpeed's counters (global_steps, skipped_steps), the optimizer state and the lr raylm sets
each step stay consistent: no update, no AdamW step counted, gradients cleared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

LOSS, GRAD = 1, 2  # bits of one rank's flag


class StepGuard:
    """Installed on a DeepSpeed engine: wraps its optimizer's step with the all-ranks check and the skip."""

    def __init__(self, ds_engine, params: list[nn.Parameter]):
        self.ds = ds_engine
        self.params = params
        self.loss_bad: torch.Tensor | bool = (
            False  # a tensor once a loss was seen: no host sync per micro-batch
        )
        self.poison_next = False  # fault drill: the next micro-batch loss on this rank becomes NaN
        self.flags: list[int] | None = None  # the last checked step's flags, one per rank
        optimizer = ds_engine.optimizer
        self._step = optimizer.step
        optimizer.step = self._guarded_step

    def watch_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-batch loss this rank computes (the loss function's hook)."""
        if self.poison_next:
            self.poison_next = False
            loss = loss * float("nan")
        self.loss_bad = ~torch.isfinite(loss.detach()).all() | self.loss_bad
        return loss

    @contextlib.contextmanager
    def not_training(self) -> Iterator[None]:
        """Around an evaluation: its losses are not the next step's, so a non-finite one flags nothing."""
        try:
            yield
        finally:
            self.loss_bad = False

    def take_flags(self) -> list[int] | None:
        """Every rank's flags for the step just run when any was set, else None (then forgotten)."""
        flags, self.flags = self.flags, None
        return flags if flags and any(flags) else None

    def _guarded_step(self, *args, **kwargs):
        flags = self._all_flags()
        self.flags = flags
        if not any(flags):
            if not _is_deepspeed_wrapper(self.ds.optimizer):
                self.ds.optimizer.overflow = False  # the engine reads it after the step
            return self._step(*args, **kwargs)
        with _forced_overflow(self.ds.optimizer) as run_step:
            if run_step:
                self._step(*args, **kwargs)

    def _all_flags(self) -> list[int]:
        device = self.ds.device
        loss_bad = torch.as_tensor(self.loss_bad, device=device).to(torch.int32)
        grad_bad = (~_grads_finite(self.params, self.ds.optimizer, device)).to(torch.int32)
        self.loss_bad = False
        vector = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
        vector[dist.get_rank()] = LOSS * loss_bad + GRAD * grad_bad
        dist.all_reduce(vector)
        return [int(v) for v in vector.tolist()]  # the step's one host sync


def _grads_finite(params: list[nn.Parameter], optimizer, device) -> torch.Tensor:
    """Whether every gradient this rank holds for the step is finite (a bool tensor): the parameters' own and,
    under ZeRO-1/2 and bf16, the reduced partitions DeepSpeed's optimizer keeps."""
    tensors = [p.grad for p in params if p.grad is not None]
    for partition in (getattr(optimizer, "averaged_gradients", None) or {}).values():
        tensors.extend(t for t in (partition or []) if t is not None)
    tensors.extend(t for t in getattr(optimizer, "fp32_groups_gradients_flat", None) or [] if t is not None)
    if not tensors:
        return torch.tensor(True, device=device)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors)).to(device)


def _is_deepspeed_wrapper(optimizer) -> bool:
    return not isinstance(optimizer, torch.optim.Optimizer) or hasattr(
        optimizer, "fp32_groups_gradients_flat"
    )


@contextlib.contextmanager
def _forced_overflow(optimizer) -> Iterator[bool]:
    """Make this step an overflow in the optimizer's own terms; yields whether its step() must still run (to take
    its overflow branch, which clears its gradient partitions)."""
    if hasattr(optimizer, "check_grad_overflow"):  # ZeRO-1/2: step() checks overflow first when asked to
        with _instance_override(
            optimizer,
            check_grad_overflow=True,
            check_overflow=lambda partition_gradients=True: setattr(optimizer, "overflow", True),
        ):
            yield True
    elif hasattr(optimizer, "_overflow_check_and_loss_scale_update"):  # ZeRO-3

        def overflowed(update_scale: bool = True) -> bool:
            optimizer.overflow = True
            return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

        with _instance_override(optimizer, _overflow_check_and_loss_scale_update=overflowed):
            yield True
    elif hasattr(
        optimizer, "clear_hp_grads"
    ):  # bf16 optimizer: its overflow branch, without the norm collective
        optimizer.overflow = True
        optimizer.clear_hp_grads()
        optimizer.clear_lp_grads()
        yield False
    else:  # torch AdamW stepped by DeepSpeed's engine (ZeRO 0, fp32): the engine clears the gradients after
        optimizer.overflow = True
        yield False


@contextlib.contextmanager
def _instance_override(obj, **attrs: object) -> Iterator[None]:
    """Set attributes on one instance for the duration (shadowing class methods), then restore them."""
    before = {name: obj.__dict__[name] for name in attrs if name in obj.__dict__}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name in attrs:
            if name in before:
                setattr(obj, name, before[name])
            else:
                delattr(obj, name)
