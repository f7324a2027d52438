"""Is a step healthy? Every rank's non-finite flags read as one verdict, and loss spikes against a rolling window."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from raylm.parallel.step_guard import GRAD, LOSS

SIGMA_FLOOR = 0.01  # of the window's mean: a flat loss curve's tiny deviation does not turn noise into spikes


@dataclass(frozen=True)
class NonFinite:
    """A step whose loss or gradients were not finite somewhere: which ranks saw what (0-based step)."""

    step: int
    loss_ranks: tuple[int, ...]
    grad_ranks: tuple[int, ...]

    @classmethod
    def from_flags(cls, step: int, flags: list[int]) -> NonFinite | None:
        """The verdict from the step guard's all-reduced per-rank flags; None when every rank was finite."""
        if not any(flags):
            return None
        return cls(
            step=step,
            loss_ranks=tuple(r for r, f in enumerate(flags) if f & LOSS),
            grad_ranks=tuple(r for r, f in enumerate(flags) if f & GRAD),
        )

    def describe(self) -> str:
        parts = []
        if self.loss_ranks:
            parts.append(f"the loss is not finite on {_ranks(self.loss_ranks)}")
        if self.grad_ranks:
            parts.append(
                f"{'gradients' if self.loss_ranks else 'the gradient norm is not finite'} on "
                f"{_ranks(self.grad_ranks)}" + (" too" if self.loss_ranks else "")
            )
        return f"step {self.step}: " + ", ".join(parts)


def _ranks(ranks: Iterable[int]) -> str:
    ranks = list(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


@dataclass(frozen=True)
class Spike:
    """A loss above mean + sigma x deviation of the window before it."""

    loss: float
    mean: float
    std: float
    threshold: float


class RollingLoss:
    """The last `window` finite losses; `check(loss)` flags a spike once the window is full. A spike (or a
    non-finite loss) stays out of the window, so it neither raises the mean nor widens the deviation."""

    def __init__(self, window: int, sigma: float, history: Iterable[float] = ()):
        self.sigma = sigma
        self.losses: deque[float] = deque(history, maxlen=window)

    def check(self, loss: float) -> Spike | None:
        if not math.isfinite(loss):
            return None
        spike = self._spike(loss)
        if spike is None:
            self.losses.append(loss)
        return spike

    def _spike(self, loss: float) -> Spike | None:
        if not self.sigma or len(self.losses) < (self.losses.maxlen or 0):
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        threshold = mean + self.sigma * max(std, SIGMA_FLOOR * abs(mean))
        return Spike(loss=loss, mean=mean, std=std, threshold=threshold) if loss > threshold else None

    def history(self) -> list[float]:
        """The window, for a checkpoint: a resumed run then judges the next losses exactly as this one would."""
        return list(self.losses)
