"""raylm's TorchTrainer hooks into two Ray Train v2 internals; this fails loudly if a Ray upgrade moves them.
And the failure policy: raylm's user errors are raised at once, everything else keeps Ray's retries."""

from __future__ import annotations

import inspect

from ray.train import FailureConfig
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2.api.exceptions import WorkerGroupError

from raylm.errors import DataError
from raylm.train.failure_policy import UserErrorsAreFinal, user_error_in
from raylm.train.ray_cluster import PG_SHUTDOWN_WAIT_ENV


def test_the_ray_train_hooks_raylm_overrides_still_exist():
    assert "failure_policy" in inspect.getsource(DataParallelTrainer.fit)  # passed to the method we override
    assert "scaling_policy" in inspect.getsource(DataParallelTrainer.fit)
    for name in ("_count_possible_workers", "_get_reserved_resources", "_get_resize_decision",
                 "make_decision_for_running_worker_group", "make_decision_for_non_running_worker_group"):
        assert callable(getattr(ElasticScalingPolicy, name)), name  # raylm.train.scaling_policy overrides or calls
    assert "recompute" in inspect.signature(_AutoscalingCoordinatorActor.get_reserved_resources).parameters
    assert callable(DataParallelTrainer._initialize_and_run_controller)
    assert list(inspect.signature(DataParallelTrainer._register_sigint_handler).parameters) == ["self", "controller"]
    assert PG_SHUTDOWN_WAIT_ENV in inspect.getsource(_TorchBackend.on_shutdown)  # the wait raylm shortens


class WrappedByRay(Exception):
    """What Ray hands back for a worker's exception: the user's error as `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__("ray wrapper")
        self.cause = cause


def test_a_user_error_on_any_worker_is_never_retried():
    policy = UserErrorsAreFinal(FailureConfig(max_failures=5))
    corrupt = DataError("shard /data/train-0001.bin has sha256 ... but the manifest says ...")
    failure = WorkerGroupError("rank 1 failed", {0: RuntimeError("collective aborted"), 1: WrappedByRay(corrupt)})
    assert policy.make_decision(failure) == FailureDecision.RAISE
    assert user_error_in(failure) is corrupt


def test_other_worker_failures_keep_ray_trains_retries():
    policy = UserErrorsAreFinal(FailureConfig(max_failures=2))
    lost = WorkerGroupError("rank 0 died", {0: RuntimeError("actor died")})
    assert [policy.make_decision(lost) for _ in range(3)] == [FailureDecision.RETRY, FailureDecision.RETRY,
                                                              FailureDecision.RAISE]
    assert user_error_in(lost) is None
