"""A sweep trial's hooks in the training loop: its rung reports, ASHA's stop decisions, and a diverged end."""

from __future__ import annotations

import math
from typing import Any

from raylm.config import Config
from raylm.log import get_logger
from raylm.train.reporter import Reporter
from raylm.train.rungs import forget_decision, stopped_at_rung, waits_for_decisions
from raylm.train.schedule import batch_size_at
from raylm.train.step import TrainState

# what Tune sees for a diverged trial: worse than any loss (raylm's files say null)
DIVERGED_LOSS = float("inf")


class NoSweep:
    """A run outside a sweep: no rung waits on a decision; a non-finite loss is fault handling's to judge."""

    def stopped_on_resume(self, session, state: TrainState) -> bool:
        return False

    def before_report(self, rung: int | None) -> None:
        pass

    def stopped_at(self, rung: int | None) -> bool:
        return False

    def diverged(self, row: dict[str, Any]) -> bool:
        return False

    def end_diverged(self, row: dict[str, Any], progress) -> None:
        raise AssertionError("only a sweep trial ends as diverged")


class TrialHooks(NoSweep):
    """A trial of a sweep (tune.trial_of): the loop calls these at a resume, after each rung report, and on a
    non-finite loss."""

    def __init__(self, cfg: Config, rank: int, reporter: Reporter):
        self.cfg, self.rank, self.reporter = cfg, rank, reporter

    def stopped_on_resume(self, session, state: TrainState) -> bool:
        """A trial resumed from the checkpoint of a rung step reports that rung again: the attempt that wrote
        it may have been interrupted before ASHA decided, and ASHA judges a trial once per rung (a rung it
        decided before goes on). Returns whether ASHA stopped the trial there."""
        step_tokens = batch_size_at(state.tokens, self.cfg.train.global_batch, self.cfg.schedule.batch)
        step_tokens *= self.cfg.data.seq_len
        rungs = self.cfg.tune.rung_tokens
        rung = next((m for m in rungs if state.tokens - step_tokens < m <= state.tokens), None)
        if rung is not None:
            self.before_report(rung)
            self.reporter.report(
                {
                    "step": state.step - 1,
                    "tokens": state.tokens,
                    "samples": state.samples,
                    "val_loss": session.evaluate(),
                    "rung_tokens": rung,
                    "resumed_rung": True,
                }
            )
        return self.stopped_at(rung)

    def before_report(self, rung: int | None) -> None:
        """Before the report of a step that crossed `rung` (None: none) in an ASHA sweep: forget what an earlier
        attempt of this trial left unread at that rung (raylm.train.rungs)."""
        if rung is not None and waits_for_decisions(self.cfg):
            forget_decision(self.cfg, self.rank, rung)

    def stopped_at(self, rung: int | None) -> bool:
        """After a rung report in an ASHA sweep: whether ASHA stopped this trial there (every rank waits for
        the decision together, raylm.tune.rung_decisions)."""
        if rung is None or not waits_for_decisions(self.cfg):
            return False
        return stopped_at_rung(self.cfg, self.rank, rung)

    def diverged(self, row: dict[str, Any]) -> bool:
        """Losses are the same on every rank, so every rank sees a divergence at the same step."""
        return not all(math.isfinite(row.get(key) or 0.0) for key in ("loss", "val_loss"))

    def end_diverged(self, row: dict[str, Any], progress) -> None:
        """A sweep trial whose loss is not finite stops at once: one `diverged` row (no NaN in JSON), one
        report."""
        row.update(diverged=True, **{key: None for key in ("loss", "val_loss", "val_ppl") if key in row})
        if progress:
            progress.writer.write(row)
            get_logger().warning(
                "step %d: the loss is not finite; this trial ends as diverged", row["step"] + 1
            )
        self.reporter.report({**row, "val_loss": DIVERGED_LOSS})


def sweep_hooks(cfg: Config, rank: int, reporter: Reporter) -> NoSweep:
    """TrialHooks for a sweep trial, NoSweep for any other run."""
    return TrialHooks(cfg, rank, reporter) if cfg.tune.trial_of else NoSweep()
