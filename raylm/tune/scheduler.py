"""The Tune schedulers of a sweep: ASHA/FIFO (the rung book) and PBT (the PBT book), asked at each rung result."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raylm.log import get_logger
from raylm.tune.asha import RungBook, read_decisions
from raylm.tune.pbt import EXPLOIT_KEY, PbtBook, split_exploit


class TokenRungScheduler(FIFOScheduler):
    """ASHA (or, with book.stops=False, FIFO that still records each rung) on `tokens`, logging decisions.jsonl.

    The records are rebuilt from decisions.jsonl at the first result this driver sees, so a restored sweep
    judges its resumed trials against the rungs its earlier trials reached."""

    def __init__(self, book: RungBook, metric: str, decisions_path: str):
        super().__init__()
        self.book, self.metric_name, self.decisions_path = book, metric, Path(decisions_path)
        self.loaded = False

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self.loaded:
            self.book.recorded.clear()
            self.book.replay(read_decisions(self.decisions_path))
            self.loaded = True
        if "tokens" not in result or self.metric_name not in result:
            return TrialScheduler.CONTINUE
        decision = self.book.decide(trial.trial_id, int(result["tokens"]), float(result[self.metric_name]))
        if decision is None:
            return TrialScheduler.CONTINUE
        row = {"trial_name": str(trial), **asdict(decision)}
        with self.decisions_path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        get_logger().info("rung %d (%d tokens): %s at %d tokens, %s=%s, cutoff %s: %s", decision.rung,
                          decision.milestone_tokens, trial, decision.tokens, self.metric_name, decision.value,
                          decision.cutoff, decision.action)
        return TrialScheduler.STOP if decision.action == "stop" else TrialScheduler.CONTINUE


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
