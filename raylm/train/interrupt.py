"""Ctrl-C and SIGTERM during `raylm train`: Ray Train aborts the worker group, then raylm exits 130 or 143.

Ray Train's own SIGINT handler aborts the run and then calls sys.exit(0) from inside the handler, which ends
the process with status 1 and no word on what was saved; SIGTERM (what `ray job stop` and Kubernetes send) it
does not handle at all. The trainer below takes over that hook: the first SIGINT or SIGTERM asks the
controller to abort (workers and placement group go), `fit()` then fails, and the driver raises Interrupted,
which names the newest committed checkpoint that a rerun of the same command resumes from. A second signal
stops waiting.
"""

from __future__ import annotations

import signal

from ray.train.torch import TorchTrainer

from raylm.errors import RaylmError
from raylm.log import get_logger

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RaylmError):
    """The run was stopped by a signal; exits with the shell's convention for it (130 for SIGINT, 143 for TERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class InterruptibleTrainer(TorchTrainer):
    """A TorchTrainer whose fit() turns SIGINT and SIGTERM into a graceful abort it remembers."""

    interrupted_by: int | None = None

    def _register_sigint_handler(self, controller) -> None:  # Ray Train v2's hook, called from fit()
        def on_signal(signum, frame):
            if self.interrupted_by is not None:
                raise KeyboardInterrupt  # a second signal: stop waiting for the abort
            self.interrupted_by = signum
            get_logger().warning("%s received: stopping the workers (a second signal stops waiting)",
                                 signal.Signals(signum).name)
            controller.abort.remote()  # the controller stops the worker group, then exits; fit() then fails

        for signum in HANDLED_SIGNALS:
            signal.signal(signum, on_signal)


def interrupted_error(signum: int, newest_checkpoint: str | None) -> Interrupted:
    """The one line a stopped run ends with: what stopped it and where a rerun continues."""
    name = signal.Signals(signum).name
    if newest_checkpoint:
        where = f"the newest committed checkpoint is {newest_checkpoint}; run the same command to resume from it"
    else:
        where = "no checkpoint was committed yet; run the same command to start again"
    return Interrupted(signum, f"interrupted by {name}: {where}")
