"""The Tune schedulers of a sweep: ASHA/FIFO (the rung book) and PBT (the PBT book), asked at each rung result."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raylm.log import get_logger
from raylm.tune.asha import CONTINUE, PAUSE, STOP, Decision, RungBook, read_decisions, rung_reports
from raylm.tune.pbt import EXPLOIT_KEY, PbtBook, split_exploit
from raylm.tune.rung_decisions import publish


class TokenRungScheduler(FIFOScheduler):
    """ASHA (or, with book.stops=False, FIFO that still records each rung) on `tokens`, logging decisions.jsonl and
    handing each rung decision to its trial (raylm.tune.rung_decisions), which waits for it at the rung.

    A trial ASHA does not promote yet is paused through Tune: its workers end and free their share, and a promoted
    trial restarts from the checkpoint it committed at the rung (Tune runs promoted trials before new ones). Paused
    trials still count as live for Tune's concurrency limit, so the limit is raised by their number. When nothing
    runs and nothing more will start, the book closes (RungBook.close): it promotes or stops the paused trials.

    The records are rebuilt from the trials' own rung rows when this driver sees its first trial, before any trial
    runs in it, so a restored sweep judges its resumed trials against the rungs its earlier trials reached."""

    def __init__(
        self,
        book: RungBook,
        metric: str,
        decisions_path: str,
        trials_dir: str,
        sweep: str,
        concurrent: int = 1,
    ):
        super().__init__()
        self.book, self.metric_name, self.decisions_path = book, metric, Path(decisions_path)
        self.trials_dir, self.sweep, self.concurrent = Path(trials_dir), sweep, concurrent
        self.to_unpause: set[str] = set()
        self.loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()

    def _load(self) -> None:
        if not self.loaded:
            self.book.rebuild(
                rung_reports(self.trials_dir, self.metric_name), read_decisions(self.decisions_path)
            )
            self.loaded = True

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        self.to_unpause.discard(trial.trial_id)
        own = None
        if "tokens" in result and self.metric_name in result:
            decisions = self.book.arrive(
                trial.trial_id, int(result["tokens"]), float(result[self.metric_name])
            )
            self._apply(tune_controller, decisions, reporting=trial)
            own = next((d.action for d in decisions if d.trial == trial.trial_id), None)
        if not self.book.stops or result.get("done"):
            return TrialScheduler.CONTINUE  # `done` marks Tune's copy of an ended trial's last result
        action = own or CONTINUE  # judged off a rung report: a trial resumed past a rung never decided
        if result.get("rung_tokens") is not None:
            # the trial waits for this; a resumed trial reports its rung again and gets what the book decided then
            action = self.book.action_of(trial.trial_id, self.book.rung_of(int(result["rung_tokens"])))
            publish(self.sweep, trial.trial_id, result["rung_tokens"], action)
        if action == STOP:
            return TrialScheduler.STOP
        if action == PAUSE:
            tune_controller.pause_trial(
                trial, should_checkpoint=False
            )  # promoted, it resumes from its folder
            return TrialScheduler.NOOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.book.end(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.book.end(trial.trial_id)

    def choose_trial_to_run(self, tune_controller):
        """Promoted paused trials first, then new ones; when nothing runs and nothing more will start, close the
        book. Never a paused trial ASHA has not promoted."""
        if not self.book.stops:
            return super().choose_trial_to_run(tune_controller)
        trials = tune_controller.get_trials()
        paused = {t.trial_id for t in trials if t.status == Trial.PAUSED}
        self.to_unpause &= paused
        _set_concurrency(tune_controller.search_alg, self.concurrent + len(paused - self.to_unpause))
        chosen = self._next(trials)
        if chosen is None and self._idle(tune_controller, trials):
            self._apply(tune_controller, self.book.close())
            chosen = self._next(trials)
        return chosen

    def _next(self, trials):
        return next(
            (t for t in trials if t.status == Trial.PAUSED and t.trial_id in self.to_unpause), None
        ) or next((t for t in trials if t.status == Trial.PENDING), None)

    def _idle(self, tune_controller, trials) -> bool:
        """Nothing runs, nothing waits to start, and the search will suggest no more trials."""
        busy = any(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        return not busy and not self.to_unpause and tune_controller.search_alg.is_finished()

    def _apply(self, tune_controller, decisions: list[Decision], reporting=None) -> None:
        """Write each decision; a paused trial promoted is resumed next, one beyond promotion stops (the trial
        reporting gets its own decision through its report's answer)."""
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for decision in decisions:
            trial = trials[decision.trial]
            self._write(trial, decision)
            if (
                reporting is not None and trial.trial_id == reporting.trial_id
            ) or trial.status != Trial.PAUSED:
                continue
            if decision.action == CONTINUE:
                self.to_unpause.add(trial.trial_id)
            elif decision.action == STOP:
                tune_controller.stop_trial(trial)

    def _write(self, trial, decision: Decision) -> None:
        row = {"trial_name": str(trial), **asdict(decision)}
        with self.decisions_path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        get_logger().info(
            "rung %d (%d tokens): %s at %d tokens, %s=%s, cutoff %s: %s (%s)",
            decision.rung,
            decision.milestone_tokens,
            trial,
            decision.tokens,
            self.metric_name,
            decision.value,
            decision.cutoff,
            decision.action,
            decision.event,
        )


def _set_concurrency(search_alg, limit: int) -> None:
    """Tune's concurrency limit (BasicVariantGenerator's, or the ConcurrencyLimiter a searcher is wrapped in)."""
    holder = search_alg
    while holder is not None and not hasattr(holder, "max_concurrent"):
        holder = getattr(holder, "searcher", None)
    if holder is not None:
        holder.max_concurrent = limit


class TokenPBTScheduler(FIFOScheduler):
    """PBT at the token rungs: a trial in the worst quantile pauses, takes the best trial's config with a perturbed
    lr and restarts from that trial's rung checkpoint (run_trial copies it). Exploits go to decisions.jsonl."""

    def __init__(self, book: PbtBook, metric: str, decisions_path: str):
        super().__init__()
        self.book, self.metric_name, self.decisions_path = book, metric, Path(decisions_path)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if "tokens" not in result or self.metric_name not in result:
            return TrialScheduler.CONTINUE
        params, _ = split_exploit(trial.config)
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        alive = {tid for tid, t in trials.items() if t.status == "RUNNING" and tid != trial.trial_id}
        exploits = self.book.decide(
            trial.trial_id,
            int(result["tokens"]),
            float(result[self.metric_name]),
            result.get("checkpoint_path"),
            params,
            alive,
        )
        action = TrialScheduler.CONTINUE
        for exploit in exploits:
            self._apply(tune_controller, trials[exploit["trial"]], exploit)
            if exploit["trial"] == trial.trial_id:
                action = (
                    TrialScheduler.NOOP
                )  # paused above; it restarts with the donor's config and checkpoint
        return action

    def _apply(self, tune_controller, target, exploit: dict) -> None:
        row = {"action": "exploit", **{k: v for k, v in exploit.items() if k != "n"}}
        with self.decisions_path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        get_logger().info(
            "PBT: %s takes %s's checkpoint %s with %s",
            target,
            exploit["donor"],
            exploit["checkpoint"],
            exploit["config"],
        )
        tune_controller.pause_trial(target, should_checkpoint=False)
        target.set_config(
            {
                **exploit["config"],
                EXPLOIT_KEY: {
                    "n": exploit["n"],
                    "donor": exploit["donor"],
                    "checkpoint": exploit["checkpoint"],
                },
            }
        )
