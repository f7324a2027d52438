"""The TorchTrainer raylm runs: Ray Train's, with raylm's failure policy and its SIGINT/SIGTERM handling.

Both hooks are Ray Train v2 internals of the pinned Ray version (`_initialize_and_run_controller`,
`_register_sigint_handler`); tests/unit/test_trainer_hooks.py fails if an upgrade moves them.
"""

from __future__ import annotations

import signal
import threading

from ray.train.torch import TorchTrainer

from raylm.train.failure_policy import UserErrorsAreFinal
from raylm.train.interrupt import HANDLED_SIGNALS, install_abort_on_signal


class RaylmTrainer(TorchTrainer):
    """fit() that never retries a user error, and turns the first SIGINT or SIGTERM into a graceful abort."""

    interrupted_by: int | None = None  # the signal that aborted the run, once one has

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
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:  # called by fit() on the main thread only
        def remember(signum: int) -> None:
            self.interrupted_by = signum

        install_abort_on_signal(controller, remember)
