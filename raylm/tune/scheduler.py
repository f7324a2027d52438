"""The Tune schedulers of a sweep: ASHA/FIFO (the rung book) and PBT (the PBT book), asked at each rung result."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raylm.log import get_logger
from raylm.tune.asha import Decision, RungBook, decided_rungs, read_decisions, rung_reports
from raylm.tune.pbt import EXPLOIT_KEY, PbtBook, split_exploit
from raylm.tune.rung_decisions import CONTINUE, publish


class TokenRungScheduler(FIFOScheduler):
    """ASHA (or, with book.stops=False, FIFO that still records each rung) on `tokens`, logging decisions.jsonl and
    handing each rung decision to its trial (raylm.tune.rung_decisions), which waits for it at the rung.

    The records are rebuilt from the trials' own rung rows when this driver sees its first trial, before any trial
    runs in it, so a restored sweep judges its resumed trials against the rungs its earlier trials reached."""

    def __init__(self, book: RungBook, metric: str, decisions_path: str, trials_dir: str, sweep: str):
        super().__init__()
        self.book, self.metric_name, self.decisions_path = book, metric, Path(decisions_path)
        self.trials_dir, self.sweep = Path(trials_dir), sweep
        self.loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()

    def _load(self) -> None:
        if not self.loaded:
            self.book.rebuild(rung_reports(self.trials_dir, self.metric_name),
                              decided_rungs(read_decisions(self.decisions_path)))
            self.loaded = True

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        decision = None
        if "tokens" in result and self.metric_name in result:
            decision = self.book.decide(trial.trial_id, int(result["tokens"]), float(result[self.metric_name]))
        if decision is not None:
            self._write(trial, decision)
        if self.book.stops and result.get("rung_tokens") is not None and not result.get("done"):
            # the trial waits for this (`done` marks Tune's copy of an ended trial's last result); a repeated rung
            # report, from a resumed trial, was decided before and goes on, unless a decision is already there
            publish(self.sweep, trial.trial_id, result["rung_tokens"], decision.action if decision else CONTINUE,
                    overwrite=decision is not None)
        return TrialScheduler.STOP if decision is not None and decision.action == "stop" else TrialScheduler.CONTINUE

    def _write(self, trial, decision: Decision) -> None:
        row = {"trial_name": str(trial), **asdict(decision)}
        with self.decisions_path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        get_logger().info("rung %d (%d tokens): %s at %d tokens, %s=%s, cutoff %s: %s", decision.rung,
                          decision.milestone_tokens, trial, decision.tokens, self.metric_name, decision.value,
                          decision.cutoff, decision.action)


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
        exploits = self.book.decide(trial.trial_id, int(result["tokens"]), float(result[self.metric_name]),
                                    result.get("checkpoint_path"), params, alive)
        action = TrialScheduler.CONTINUE
        for exploit in exploits:
            self._apply(tune_controller, trials[exploit["trial"]], exploit)
            if exploit["trial"] == trial.trial_id:
                action = TrialScheduler.NOOP  # paused above; it restarts with the donor's config and checkpoint
        return action

    def _apply(self, tune_controller, target, exploit: dict) -> None:
        row = {"action": "exploit", **{k: v for k, v in exploit.items() if k != "n"}}
        with self.decisions_path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        get_logger().info("PBT: %s takes %s's checkpoint %s with %s", target, exploit["donor"],
                          exploit["checkpoint"], exploit["config"])
        tune_controller.pause_trial(target, should_checkpoint=False)
        target.set_config({**exploit["config"], EXPLOIT_KEY: {"n": exploit["n"], "donor": exploit["donor"],
                                                              "checkpoint": exploit["checkpoint"]}})
