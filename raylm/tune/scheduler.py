"""The Tune scheduler of a sweep: asks the rung book at every result that carries tokens and the metric."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from raylm.log import get_logger
from raylm.tune.asha import RungBook, read_decisions


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
