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
    1/reduction_factor of those recorded at M_k before it. Judged once per rung, at the highest rung it reached.

    `recorded` keeps each rung's values in the order the trials reached it; `judged` the (trial, rung) pairs
    already decided, so a trial recorded by `rebuild` but never decided is still judged when it reports."""

    milestones_tokens: list[int]
    reduction_factor: int
    stops: bool = True
    recorded: dict[int, dict[str, float]] = field(default_factory=dict)
    judged: set[tuple[str, int]] = field(default_factory=set)

    def rung_of(self, tokens: int) -> int | None:
        """The highest rung whose milestone `tokens` reached (None: below the first)."""
        reached = [k for k, m in enumerate(self.milestones_tokens) if tokens >= m]
        return reached[-1] if reached else None

    def decide(self, trial: str, tokens: int, value: float) -> Decision | None:
        rung = self.rung_of(tokens)
        if rung is None or (trial, rung) in self.judged:
            return None
        at_rung = self.recorded.setdefault(rung, {})
        before = list(at_rung)[:list(at_rung).index(trial)] if trial in at_rung else list(at_rung)
        cutoff = self.cutoff([at_rung[other] for other in before])
        judged = value if math.isfinite(value) else WORST_VALUE
        at_rung[trial] = judged  # a trial recorded by rebuild keeps its place in the order
        self.judged.add((trial, rung))
        action = "stop" if cutoff is not None and judged > cutoff else "continue"
        return Decision(trial=trial, rung=rung, milestone_tokens=self.milestones_tokens[rung], tokens=tokens,
                        value=value if math.isfinite(value) else None, cutoff=cutoff,
                        action=action if self.stops else "record")

    def cutoff(self, values: list[float]) -> float | None:
        """The value at the 1/rf quantile of those recorded (lower is better): worse than it means stop."""
        return float(np.percentile(values, 100.0 / self.reduction_factor)) if values else None

    def rebuild(self, reports: list[RungReport], decided: set[tuple[str, int]]) -> None:
        """The records from the trials' own rung rows, in time order (the first per trial and rung counts): Ray
        does not persist ASHA's rungs across a restore (ray#30838), and a row whose decision was never written
        (the driver died between the two) still counts. `decided`: the (trial, rung) pairs decisions.jsonl holds,
        which are not judged again."""
        self.recorded.clear()
        for report in sorted(reports, key=lambda r: r.time):
            rung = self.rung_of(report.tokens)
            if rung is not None:
                value = report.value if report.value is not None and math.isfinite(report.value) else WORST_VALUE
                self.recorded.setdefault(rung, {}).setdefault(report.trial, value)
        self.judged = set(decided)


@dataclass(frozen=True)
class RungReport:
    """One rung row of a trial's metrics.jsonl: when it was written, the tokens and the metric (None: diverged)."""

    trial: str
    time: float
    tokens: int
    value: float | None


def rung_reports(trials_dir: Path, metric: str) -> list[RungReport]:
    """Every trial's rows that carry `rung_tokens` (a trial's folder is named by its trial id)."""
    from raylm.train.metrics import read_metrics

    return [RungReport(trial=folder.name, time=row["time"], tokens=row["tokens"], value=row.get(metric))
            for folder in sorted(p for p in trials_dir.glob("*") if p.is_dir())
            for row in read_metrics(folder) if "rung_tokens" in row]


def decided_rungs(decisions: list[dict]) -> set[tuple[str, int]]:
    """(trial, rung) of every ASHA or FIFO decision in decisions.jsonl (PBT exploits are no rung decisions)."""
    return {(row["trial"], row["rung"]) for row in decisions if row["action"] in ("continue", "stop", "record")}


def read_decisions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
