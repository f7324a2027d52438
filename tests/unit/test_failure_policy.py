"""raylm's Ray Train failure policy: user errors are raised at once, everything else keeps Ray's retries."""

from __future__ import annotations

from ray.train import FailureConfig
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from raylm.errors import DataError
from raylm.train.failure_policy import UserErrorsAreFinal, user_error_in


class WrappedByRay(Exception):
    """What Ray hands back for a worker's exception: the user's error as `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__("ray wrapper")
        self.cause = cause


def test_a_user_error_on_any_worker_is_never_retried():
    policy = UserErrorsAreFinal(FailureConfig(max_failures=5))
    corrupt = DataError("shard /data/train-0001.bin has sha256 ... but the manifest says ...")
    failure = WorkerGroupError(
        "rank 1 failed", {0: RuntimeError("collective aborted"), 1: WrappedByRay(corrupt)}
    )
    assert policy.make_decision(failure) == FailureDecision.RAISE
    assert user_error_in(failure) is corrupt


def test_other_worker_failures_keep_ray_trains_retries():
    policy = UserErrorsAreFinal(FailureConfig(max_failures=2))
    lost = WorkerGroupError("rank 0 died", {0: RuntimeError("actor died")})
    assert [policy.make_decision(lost) for _ in range(3)] == [
        FailureDecision.RETRY,
        FailureDecision.RETRY,
        FailureDecision.RAISE,
    ]
    assert user_error_in(lost) is None
