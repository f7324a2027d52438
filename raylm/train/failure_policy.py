"""Which worker failures Ray Train retries: lost workers and crashes yes, raylm's own user errors never.

A corrupt shard, a damaged checkpoint under resume=required or a config the workers refuse fail the same way
on every attempt: retrying them only burns `fault.max_failures` (and minutes) before the same error. So a
worker group failure any of whose workers raised a RaylmError is raised at once, and `max_failures` stays for
what a restart can fix: a killed worker, a lost node, a collective that timed out.

Ray Train v2 has no public failure-policy API: UserErrorsAreFinal subclasses an internal of the pinned Ray
version (`DefaultFailurePolicy`, docs/private-apis.md); tests/unit/test_private_api_canary.py fails if an
upgrade moves it.
"""

from __future__ import annotations

from pathlib import Path

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from raylm.errors import RaylmError
from raylm.log import get_logger, setup_logging
from raylm.train.fault_lines import FaultLines


def user_error_of(failure: BaseException) -> RaylmError | None:
    """The RaylmError a worker raised, looked for along the exception's causes (Ray wraps what workers raise)."""
    seen: BaseException | None = failure
    for _ in range(16):  # cause chains are short; the bound only guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, RaylmError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return None


def user_error_in(error: BaseException) -> RaylmError | None:
    """The first RaylmError behind a training failure: one of a worker group's failures (lowest rank first),
    or one along the error's own causes."""
    if isinstance(error, WorkerGroupError):
        for rank in sorted(error.worker_failures):
            found = user_error_of(error.worker_failures[rank])
            if found is not None:
                return found
    return user_error_of(error)


class UserErrorsAreFinal(DefaultFailurePolicy):
    """Ray Train's default policy, except that a RaylmError from any worker is never retried; and every worker
    group failure gets raylm's one console line (raylm.train.fault_lines) when the run folder is local."""

    def __init__(self, failure_config, run_dir: Path | None = None):
        super().__init__(failure_config)
        self.lines = FaultLines(run_dir) if run_dir is not None else None
        self.group_failures = 0

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if user_error_in(training_failed_error) is not None:
            return FailureDecision.RAISE
        decision = super().make_decision(training_failed_error)
        if isinstance(training_failed_error, WorkerGroupError) and self.lines is not None:
            self.group_failures += 1
            setup_logging(0)  # this runs in Ray Train's controller: its lines reach the driver's console
            get_logger().warning(
                self.lines.line(
                    training_failed_error.worker_failures,
                    self.group_failures,
                    self.failure_config.max_failures,
                )
            )
        return decision
