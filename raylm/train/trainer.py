"""The TorchTrainer raylm runs: Ray Train's, with raylm's failure policy, its scaling policy for elastic runs, its
SIGINT/SIGTERM handling, and a short process-group shutdown wait.

The hooks are Ray Train internals of the pinned Ray version (`_initialize_and_run_controller`,
`_register_sigint_handler`, `_TorchBackend.on_shutdown`); tests/unit/test_trainer_hooks.py fails if an upgrade
moves them.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from raylm.train.failure_policy import UserErrorsAreFinal
from raylm.train.interrupt import HANDLED_SIGNALS, install_abort_on_signal


@dataclass(frozen=True)
class ElasticGroup:
    """What the scaling policy of an elastic run needs: the TP size, the workers of one DP replica (pp * tp) and
    the name of the run's resize channel (raylm.train.elastic)."""

    tp: int
    replica_workers: int
    channel: str


class RaylmTrainer(TorchTrainer):
    """fit() that never retries a user error, sizes elastic groups in whole DP replicas, and turns the first SIGINT
    or SIGTERM into a graceful abort."""

    interrupted_by: int | None = None  # the signal that aborted the run, once one has
    elastic: ElasticGroup | None = None  # set for a run with a parallel.dp range

    def fit(self):
        """Ray Train's fit(), then the signal handlers from before it: the handler holds the run's controller
        handle, and while any reference to it lives the TrainController actor outlives the run."""
        if threading.current_thread() is not threading.main_thread():  # Tune trials: no handlers are installed
            return super().fit()
        previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
        try:
            return super().fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorsAreFinal(self.run_config.failure_config)
        if self.elastic is not None:
            from raylm.train.scaling_policy import WholeReplicaScalingPolicy

            controller_init_kwargs["scaling_policy"] = WholeReplicaScalingPolicy(
                self.scaling_config, self.elastic.tp, self.elastic.replica_workers, self.elastic.channel)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:  # called by fit() on the main thread only
        def remember(signum: int) -> None:
            self.interrupted_by = signum

        install_abort_on_signal(controller, remember)


PG_SHUTDOWN_WAIT_S = "5"  # Ray waits 30 s by default; a healthy rank destroys its process group in well under 1 s
PG_SHUTDOWN_WAIT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # read by Ray's torch backend at each shutdown


class _ShortShutdownBackend(_TorchBackend):
    """Ray's torch backend, waiting PG_SHUTDOWN_WAIT_S for the workers to leave their process group before a
    restart: a stalled (SIGSTOPped) rank never answers, and each second of that wait delays the restart."""

    def on_shutdown(self, worker_group, backend_config) -> None:
        os.environ.setdefault(PG_SHUTDOWN_WAIT_ENV, PG_SHUTDOWN_WAIT_S)  # in the controller; a user's value wins
        super().on_shutdown(worker_group, backend_config)


@dataclass
class RaylmTorchConfig(TorchConfig):
    """TorchConfig (backend, timeout_s of the default process group) with the short shutdown wait."""

    @property
    def backend_cls(self):
        return _ShortShutdownBackend
