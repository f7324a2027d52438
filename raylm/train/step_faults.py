"""What the training loop does after a bad step: stop, skip or roll back on a non-finite loss or gradient
(fault.nonfinite), warn or roll back on a loss spike (fault.spike). Every rank takes the same decision: the
non-finite flags come from one all-reduce before the optimizer step, and the loss is the same on every rank."""

from __future__ import annotations

from typing import Any

from raylm.config import Config
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.storage.location import Location
from raylm.train.anomaly import NonFinite, RollingLoss
from raylm.train.checkpointing import resume
from raylm.train.step import TrainState


class StepFaults:
    """Judges each step's row; keeps the spike window and the rollbacks so far (both go into checkpoints)."""

    def __init__(self, cfg: Config, engine, saved: dict[str, Any] | None = None):
        self.cfg, self.engine = cfg, engine
        self.load_state_dict(saved or {})

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """The spike window and the rollbacks of a checkpoint's trainer state (none: a fresh run)."""
        self.rolling = RollingLoss(
            self.cfg.fault.spike_window, self.cfg.fault.spike_sigma, saved.get("loss_window", ())
        )
        self.rolled_back: list[dict[str, Any]] = list(saved.get("rolled_back", []))

    def judge(self, row: dict[str, Any], before: TrainState, after: TrainState) -> bool:
        """Annotate the step's metrics row; raise under fault.nonfinite=stop; True when the loop must roll back.
        A non-finite step was not applied on any rank (the step guard skipped it)."""
        flags = self.engine.take_nonfinite_flags()
        bad = NonFinite.from_flags(row["step"], flags) if flags else None
        samples = [before.samples, after.samples]  # the global sample ids [start, end) this step consumed
        if bad is not None:
            return self._nonfinite(bad, row, samples)
        spike = self.rolling.check(row["loss"])
        if spike is None:
            return False
        row["spike"] = {
            "loss_mean": spike.mean,
            "loss_std": spike.std,
            "threshold": spike.threshold,
            "samples": samples,
            "action": self.cfg.fault.spike,
        }
        get_logger().warning(
            "step %d: loss spike %.4f above %.4f (mean %.4f + %g sigma of the last %d steps); "
            "samples %d..%d; fault.spike=%s",
            row["step"],
            row["loss"],
            spike.threshold,
            spike.mean,
            self.cfg.fault.spike_sigma,
            len(self.rolling.losses),
            samples[0],
            samples[1] - 1,
            self.cfg.fault.spike,
        )
        return self.cfg.fault.spike == "rollback"

    def _nonfinite(self, bad: NonFinite, row: dict[str, Any], samples: list[int]) -> bool:
        policy = self.cfg.fault.nonfinite
        if self.cfg.tune.trial_of:  # a sweep trial ends as diverged (TrialHooks), whatever the policy
            row["loss"] = float("nan")
            return False
        if policy == "stop":
            raise RaylmError(
                f"{bad.describe()}; fault.nonfinite=stop: the step was not applied and no checkpoint "
                f"was written from it; set fault.nonfinite=skip or rollback to train past such steps"
            )
        row["loss"] = None  # JSON has no NaN
        detail = {
            "reason": "nonfinite",
            "samples": samples,
            "loss_ranks": list(bad.loss_ranks),
            "grad_ranks": list(bad.grad_ranks),
        }
        if policy == "skip":
            row["skipped"] = detail
            get_logger().warning(
                "%s; fault.nonfinite=skip: no rank updated its weights; samples %d..%d skipped",
                bad.describe(),
                samples[0],
                samples[1] - 1,
            )
            return False
        row["nonfinite"] = detail
        get_logger().warning("%s; fault.nonfinite=rollback", bad.describe())
        return True

    def rollback(self, run_dir: Location, rank: int, row: dict[str, Any], state: TrainState) -> bool:
        """Reload the newest committed checkpoint on every rank; the samples from its cursor to this step's end are
        never trained on (the data cursor stays where it is). False when there is no checkpoint yet: a
        non-finite step is then skipped, a spike only reported."""
        restored = resume(self.cfg, self.engine, run_dir, rank)
        if restored.source is None:
            get_logger().warning(
                "step %d: no committed checkpoint to roll back to; going on without rollback", row["step"]
            )
            if "nonfinite" in row:  # the guard did not apply the step: it was skipped
                row["skipped"] = row.pop("nonfinite")
            return False
        window = {
            "step": row["step"],
            "to_step": restored.state.step,
            "samples": [restored.state.samples, state.samples],
        }
        row["rollback"] = window
        self.rolled_back.append(window)
        get_logger().warning(
            "step %d: rolled back to checkpoint %s; samples %d..%d are skipped",
            row["step"],
            restored.source.name,
            window["samples"][0],
            window["samples"][1] - 1,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run judges and accounts exactly as this one would."""
        return {"loss_window": self.rolling.history(), "rolled_back": self.rolled_back}
