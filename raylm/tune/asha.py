"""ASHA on tokens trained with every decision written down: the rung book (pure), and reading back what it wrote."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from raylm.train.metrics import read_metrics
from raylm.train.rungs import CONTINUE, PAUSE, STOP

WORST_VALUE = 1e30  # a diverged trial's recorded value: worse than any loss
RECORD = "record"  # besides the trial-facing CONTINUE, PAUSE and STOP (raylm.train.rungs)
# when a decision was taken: at the trial's own rung report, on another trial's report, or when the sweep had
# nothing left to run (RungBook.close)
AT_REPORT, ON_LATER_REPORT, AT_CLOSE = "report", "later report", "rung closed"
RUNG_FULL = "rung full"  # a later report left no trial that could still reach this rung


@dataclass(frozen=True)
class Decision:
    """One ASHA judgement of a trial that reached rung `rung` (at `milestone_tokens`) with `tokens` and `value`."""

    trial: str
    rung: int
    milestone_tokens: int
    tokens: int
    value: float | None  # None: not finite (a diverged trial)
    cutoff: float | None  # the worst value still promoted at this rung then (None: no promotion yet possible)
    action: (
        str  # continue (promoted) | pause (waits at the rung) | stop | record (FIFO: judged, never stopped)
    )
    event: str = AT_REPORT


@dataclass
class RungBook:
    """Asynchronous successive halving as Li et al. define it (ASHA, arXiv:1810.05934, algorithm 2), on token
    milestones: a trial that reaches M_k goes on (is promoted) only while it is among the best floor(n/rf) of the n
    trials recorded at M_k that have not been promoted yet; otherwise it pauses there, and a later arrival may
    promote it. So rung k promotes exactly floor(n_k / rf) trials whatever the order they arrive in (Ray's
    ASHAScheduler instead lets every trial go on that is not below the cutoff, so the first to reach a rung always
    goes on, and the tokens spent depend on arrival order).

    Three additions make a finite sweep end without idle waits, given `total_trials`: a paused trial that can no
    longer be promoted (the trials better than it fill every promotion the rung can still make) stops at once; a
    rung that no further trial can reach promotes at least its best and stops the rest (so a sweep of one trial
    never pauses); and when the sweep runs nothing and starts nothing more, `close()` promotes at least one trial at
    the lowest rung that has none, or else stops every paused trial. A diverged trial (value not finite) stops at
    its rung and is never promoted.

    `recorded` keeps each rung's values in the order the trials reached it; `judged` the (trial, rung) pairs
    already decided, so a trial recorded by `rebuild` but never decided is still judged when it reports."""

    milestones_tokens: list[int]
    reduction_factor: int
    total_trials: int = 0  # trials the sweep will run (0: unknown, so a paused trial stops only at close())
    stops: bool = True
    recorded: dict[int, dict[str, float]] = field(default_factory=dict)
    judged: set[tuple[str, int]] = field(default_factory=set)
    promoted: set[tuple[str, int]] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)  # trials that ended on their own (finished, failed)
    tokens_at: dict[tuple[str, int], int] = field(default_factory=dict)

    def rung_of(self, tokens: int) -> int | None:
        """The highest rung whose milestone `tokens` reached (None: below the first)."""
        reached = [k for k, m in enumerate(self.milestones_tokens) if tokens >= m]
        return reached[-1] if reached else None

    def arrive(self, trial: str, tokens: int, value: float) -> list[Decision]:
        """A trial reported `value` at `tokens`: its own decision first, then those it caused for paused trials
        (promoted by its arrival, or now beyond promotion). Empty below the first rung or at a rung judged before."""
        rung = self.rung_of(tokens)
        if rung is None or (trial, rung) in self.judged:
            return []
        self.recorded.setdefault(rung, {})[trial] = value if math.isfinite(value) else WORST_VALUE
        self.judged.add((trial, rung))
        self.tokens_at[(trial, rung)] = tokens
        if not self.stops:
            return [self._decision(trial, rung, RECORD, AT_REPORT)]
        if not math.isfinite(value):
            self.stopped.add(trial)
            return [self._decision(trial, rung, STOP, AT_REPORT)]
        decisions = self._promote(rung, self._quota(rung), ON_LATER_REPORT) + self._drop_hopeless(rung)
        for later in range(rung, len(self.milestones_tokens)):
            decisions += self._close_if_full(later)
        if not any(d.trial == trial for d in decisions):
            decisions.append(self._decision(trial, rung, PAUSE, AT_REPORT))
        own = [replace(d, event=AT_REPORT) for d in decisions if d.trial == trial]
        return own + [d for d in decisions if d.trial != trial]

    def action_of(self, trial: str, rung: int | None) -> str:
        """What a trial that reports rung `rung` (again, after a restart) does now."""
        if (trial, rung) in self.promoted or (trial, rung) not in self.judged:
            return CONTINUE
        return STOP if trial in self.stopped else PAUSE

    def waiting(self) -> list[tuple[str, int]]:
        """(trial, rung) of every paused trial, in the order they arrived."""
        return [
            (trial, rung)
            for rung in sorted(self.recorded)
            for trial in self.recorded[rung]
            if self._waits(trial, rung)
        ]

    def end(self, trial: str) -> None:
        """The trial ended on its own: a later arrival no longer promotes it."""
        self.ended.add(trial)

    def close(self) -> list[Decision]:
        """Nothing runs and nothing more will start: promote at least one trial at the lowest rung that promoted
        none (its arrivals were too few for floor(n / rf)); if no rung can, every paused trial stops."""
        for rung in sorted(self.recorded):
            promoted = self._promote(
                rung, max(1, self._quota(rung)), AT_CLOSE, within=len(self.recorded[rung])
            )
            if promoted:
                return promoted
        waiting = self.waiting()
        self.stopped.update(trial for trial, _ in waiting)
        return [self._decision(trial, rung, STOP, AT_CLOSE) for trial, rung in waiting]

    def _quota(self, rung: int) -> int:
        return len(self.recorded.get(rung, {})) // self.reduction_factor

    def _ranked(self, rung: int) -> list[str]:
        """The rung's trials best first (ties: the earlier arrival first)."""
        at = self.recorded.get(rung, {})
        return sorted(at, key=lambda trial: at[trial])

    def _waits(self, trial: str, rung: int) -> bool:
        return (
            (trial, rung) in self.judged
            and (trial, rung) not in self.promoted
            and trial not in self.stopped
            and trial not in self.ended
        )

    def _waiting_at(self, rung: int) -> list[str]:
        """The rung's paused trials, best first."""
        return [trial for trial in self._ranked(rung) if self._waits(trial, rung)]

    def _promoted_at(self, rung: int) -> int:
        return sum(1 for _, k in self.promoted if k == rung)

    def _promote(self, rung: int, quota: int, event: str, within: int | None = None) -> list[Decision]:
        """Promote the best paused trials among the rung's top `within` (default: `quota`) until `quota` are."""
        decisions = []
        for trial in self._ranked(rung)[: quota if within is None else within]:
            if self._promoted_at(rung) >= quota:
                break
            if self._waits(trial, rung) and self.recorded[rung][trial] < WORST_VALUE:
                self.promoted.add((trial, rung))
                decisions.append(self._decision(trial, rung, CONTINUE, event, quota))
        return decisions

    def _most_promoted(self, rung: int) -> int:
        """How many trials rung `rung` can ever promote: floor(n_max / rf), at least one, where n_max is the number
        of trials (rung 0) or what the rung below can ever promote."""
        most = self.total_trials
        for _ in range(rung + 1):
            most = max(1, most // self.reduction_factor)
        return most

    def _drop_hopeless(self, rung: int) -> list[Decision]:
        """Stop the paused trials of `rung` that the trials better than them shut out of every promotion left."""
        if not self.total_trials:
            return []
        decisions, ahead = [], 0
        for trial in self._ranked(rung):
            if self._waits(trial, rung) and self._promoted_at(rung) + ahead >= self._most_promoted(rung):
                self.stopped.add(trial)
                decisions.append(self._decision(trial, rung, STOP, ON_LATER_REPORT))
            elif self._waits(trial, rung):
                ahead += 1
        return decisions

    def _close_if_full(self, rung: int) -> list[Decision]:
        """A rung no other trial can reach any more promotes at least one of its paused trials and stops the rest
        (a sweep of one trial never pauses)."""
        waiting = self._waiting_at(rung)
        if not waiting or not self.total_trials or self._may_still_arrive(rung) > 0:
            return []
        decisions = self._promote(rung, max(1, self._quota(rung)), RUNG_FULL, within=len(self.recorded[rung]))
        rest = [trial for trial in waiting if self._waits(trial, rung)]
        self.stopped.update(rest)
        return decisions + [self._decision(trial, rung, STOP, RUNG_FULL) for trial in rest]

    def _may_still_arrive(self, rung: int) -> int:
        """At most how many trials not yet recorded at `rung` may still reach it."""
        if rung == 0:
            return max(0, self.total_trials - len(self.recorded.get(0, {})))
        below = rung - 1
        on_the_way = sum(
            1
            for trial, k in self.promoted
            if k == below and (trial, rung) not in self.judged and trial not in self.ended
        )
        promotions_left = max(0, self._most_promoted(below) - self._promoted_at(below))
        return on_the_way + min(promotions_left, len(self._waiting_at(below)) + self._may_still_arrive(below))

    def _decision(self, trial: str, rung: int, action: str, event: str, quota: int | None = None) -> Decision:
        value = self.recorded[rung][trial]
        quota = self._quota(rung) if quota is None else quota
        ranked = self._ranked(rung)
        return Decision(
            trial=trial,
            rung=rung,
            milestone_tokens=self.milestones_tokens[rung],
            tokens=self.tokens_at[(trial, rung)],
            value=value if value < WORST_VALUE else None,
            cutoff=self.recorded[rung][ranked[quota - 1]] if quota and self.stops else None,
            action=action,
            event=event,
        )

    def rebuild(self, reports: list[RungReport], decisions: list[dict]) -> None:
        """The records from the trials' own rung rows, in time order (the first per trial and rung counts): Ray
        does not persist ASHA's rungs across a restore (ray#30838), and a row whose decision was never written
        (the driver died between the two) still counts. `decisions`: decisions.jsonl's rows; the (trial, rung)
        pairs they hold are not judged again, and their promotions and stops stand."""
        self.recorded.clear()
        for report in sorted(reports, key=lambda r: r.time):
            rung = self.rung_of(report.tokens)
            if rung is not None:
                value = (
                    report.value if report.value is not None and math.isfinite(report.value) else WORST_VALUE
                )
                self.recorded.setdefault(rung, {}).setdefault(report.trial, value)
                self.tokens_at.setdefault((report.trial, rung), report.tokens)
        rows = [row for row in decisions if row["action"] in (CONTINUE, PAUSE, STOP, RECORD)]
        self.judged = {(row["trial"], row["rung"]) for row in rows}
        self.promoted = {(row["trial"], row["rung"]) for row in rows if row["action"] == CONTINUE}
        self.stopped = {row["trial"] for row in rows if row["action"] == STOP}


@dataclass(frozen=True)
class RungReport:
    """One rung row of a trial's metrics.jsonl: when it was written, the tokens and the metric (None: diverged)."""

    trial: str
    time: float
    tokens: int
    value: float | None


def rung_reports(trials_dir: Path, metric: str) -> list[RungReport]:
    """Every trial's rows that carry `rung_tokens` (a trial's folder is named by its trial id)."""
    return [
        RungReport(trial=folder.name, time=row["time"], tokens=row["tokens"], value=row.get(metric))
        for folder in sorted(p for p in trials_dir.glob("*") if p.is_dir())
        for row in read_metrics(folder)
        if "rung_tokens" in row
    ]


def read_decisions(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
