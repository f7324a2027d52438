"""ASHA on tokens trained with every decision written down: a pure rung book, and the Tune scheduler around it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WORST_VALUE = 1e30  # a diverged trial's value in a cutoff: worse than any loss, and finite for the percentile


@dataclass(frozen=True)
class Decision:
    """One ASHA judgement: a trial reached rung `rung` (at `milestone_tokens`) with `tokens` and `value`."""

    trial: str
    rung: int
    milestone_tokens: int
    tokens: int
    value: float | None  # None: not finite (a diverged trial)
    cutoff: float | None  # None: the first trial at this rung
    action: str  # continue | stop | record (FIFO: judged, never stopped)


@dataclass
class RungBook:
    """Asynchronous successive halving (Li et al. 2018, as Ray's ASHAScheduler with stop_last_trials=False) on
    token milestones: a trial reaching milestone M_k is stopped when its value is worse than the best
    1/reduction_factor of those recorded at M_k so far. Judged once per rung, at the highest rung it reached."""

    milestones_tokens: list[int]
    reduction_factor: int
    stops: bool = True
    recorded: dict[int, dict[str, float]] = field(default_factory=dict)

    def decide(self, trial: str, tokens: int, value: float) -> Decision | None:
        reached = [k for k, m in enumerate(self.milestones_tokens) if tokens >= m]
        if not reached:
            return None
        rung = reached[-1]
        at_rung = self.recorded.setdefault(rung, {})
        if trial in at_rung:
            return None
        cutoff = self.cutoff(list(at_rung.values()))
        judged = value if math.isfinite(value) else WORST_VALUE
        at_rung[trial] = judged
        action = "stop" if cutoff is not None and judged > cutoff else "continue"
        return Decision(trial=trial, rung=rung, milestone_tokens=self.milestones_tokens[rung], tokens=tokens,
                        value=value if math.isfinite(value) else None, cutoff=cutoff,
                        action=action if self.stops else "record")

    def cutoff(self, values: list[float]) -> float | None:
        """The value at the 1/rf quantile of those recorded (lower is better): worse than it means stop."""
        return float(np.percentile(values, 100.0 / self.reduction_factor)) if values else None

    def replay(self, decisions: list[dict]) -> None:
        """Rebuild the records from decisions.jsonl: Ray does not persist ASHA's rungs across a restore (ray#30838)."""
        for row in decisions:
            value = row["value"] if row["value"] is not None else WORST_VALUE
            self.recorded.setdefault(row["rung"], {})[row["trial"]] = value


def read_decisions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
