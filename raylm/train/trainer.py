"""The TorchTrainer raylm runs: Ray Train's, with raylm's failure policy, scaling policy and signal handling.

The failure policy, the scaling policy for elastic runs and the SIGINT/SIGTERM handling are set here; the
short process-group shutdown wait is in the job's environment (raylm.ray_connect).

The hooks are Ray Train internals of the pinned Ray version (`_initialize_and_run_controller`,
`_register_sigint_handler`): docs/private-apis.md; tests/unit/test_private_api_canary.py fails if an upgrade
moves them.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from raylm.train.failure_policy import UserErrorsAreFinal
from raylm.train.interrupt import HANDLED_SIGNALS, install_abort_on_signal


@dataclass(frozen=True)
class ElasticGroup:
    """What the scaling policy of an elastic run needs: the TP size, the workers of one DP replica (pp * cp * tp) and
    the name of the run's resize channel (raylm.train.elastic)."""

    tp: int
    replica_workers: int
    channel: str


class RaylmTrainer(TorchTrainer):
    """fit() that never retries a user error, sizes elastic groups in whole DP replicas, turns the first SIGINT
    or SIGTERM into a graceful abort, and leaves out the placement-group cleaner where it cannot work."""

    interrupted_by: int | None = None  # the signal that aborted the run, once one has
    elastic: ElasticGroup | None = None  # set for a run with a parallel.dp range
    run_dir: Path | None = (
        None  # a local run folder: failures get raylm's console line (raylm.train.fault_lines)
    )
    placement_group_cleaner: bool = True  # False: Ray Train's cleaner actor cannot work here (ray_connect)

    def fit(self):
        """Ray Train's fit(), then the signal handlers from before it: the handler holds the run's controller
        handle, and while any reference to it lives the TrainController actor outlives the run."""
        if (
            threading.current_thread() is not threading.main_thread()
        ):  # Tune trials: no handlers are installed
            return super().fit()
        previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
        try:
            return super().fit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorsAreFinal(
            self.run_config.failure_config, self.run_dir
        )
        if not self.placement_group_cleaner:
            controller_init_kwargs["callbacks"] = [
                c
                for c in controller_init_kwargs["callbacks"]
                if not isinstance(c, PlacementGroupCleanerCallback)
            ]
        if self.elastic is not None:
            from raylm.train.scaling_policy import WholeReplicaScalingPolicy

            controller_init_kwargs["scaling_policy"] = WholeReplicaScalingPolicy(
                self.scaling_config, self.elastic.tp, self.elastic.replica_workers, self.elastic.channel
            )
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:  # called by fit() on the main thread only
        def remember(signum: int) -> None:
            self.interrupted_by = signum

        install_abort_on_signal(controller, remember)
