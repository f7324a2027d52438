"""Ctrl-C and SIGTERM during `raylm train`: Ray Train aborts the worker group, then raylm exits 130 or 143.

Ray Train's own SIGINT handler aborts the run and then calls sys.exit(0) from inside the handler, which ends
the process with status 1 and no word on what was saved; SIGTERM (what `ray job stop` and Kubernetes send) it
does not handle at all. raylm's trainer (raylm.train.trainer) takes over that hook with the handler below: the
first SIGINT or SIGTERM asks the controller to abort (workers and placement group go), `fit()` then fails, and
the driver raises Interrupted, which names the newest committed checkpoint that a rerun of the same command
resumes from. A second signal stops waiting.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from raylm.errors import RaylmError
from raylm.log import get_logger

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RaylmError):
    """The run was stopped by a signal; exits with the shell's convention for it (130 for SIGINT, 143 for TERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def install_abort_on_signal(controller, on_first: Callable[[int], None]) -> None:
    """Handle SIGINT and SIGTERM: the first asks Ray Train's controller to abort the run (it stops the worker
    group, then exits, so fit() fails) and is reported to `on_first`; a second one stops waiting."""
    received: list[int] = []

    def on_signal(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        on_first(signum)
        get_logger().warning(
            "%s received: stopping the workers (a second signal stops waiting)", signal.Signals(signum).name
        )
        controller.abort.remote()

    for signum in HANDLED_SIGNALS:
        signal.signal(signum, on_signal)


def interrupted_error(signum: int, newest_checkpoint: str | None) -> Interrupted:
    """The one line a stopped run ends with: what stopped it and where a rerun continues."""
    name = signal.Signals(signum).name
    if newest_checkpoint:
        where = (
            f"the newest committed checkpoint is {newest_checkpoint}; run the same command to resume from it"
        )
    else:
        where = "no checkpoint was committed yet; run the same command to start again"
    return Interrupted(signum, f"interrupted by {name}: {where}")
