"""A tracker run off the training step's path: a thread that opens it, sends rows in batches, and gives up once.

The loop only queues rows. The thread opens the tracker (a network round trip, or minutes of retries when the
server is down), then sends whatever rows queued up, at most every FLUSH_EVERY_S seconds, in one batch. The first
error warns once, naming the tracker and its variables, and the tracker is dropped: the run goes on without it."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from raylm.log import get_logger
from raylm.train.tracking.base import Tracker

FLUSH_EVERY_S = 2.0  # a batch at most this often (one request to a tracking server)
CLOSE_WAIT_S = 30.0  # how long the end of a run waits for the rows still queued
SETTINGS = {"mlflow": "MLFLOW_TRACKING_URI", "wandb": "the WANDB_* variables"}
_CLOSE = object()


class BackgroundTracker(Tracker):
    """`open_tracker()` runs in the thread; the tracker it returns gets every row queued with log_rows."""

    def __init__(self, name: str, open_tracker: Callable[[], Tracker]):
        self.name = name
        self.failed = False
        self._open = open_tracker
        self._queue: queue.Queue[Any] = queue.Queue()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=f"raylm-{name}", daemon=True)
        self._thread.start()

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        if not self.failed:
            self._queue.put(rows)

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        self.log_rows(rows)  # the tracker skips the steps it holds

    def close(self, finished: bool) -> None:
        self._finished = finished
        self._queue.put(_CLOSE)
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive() and not self.failed:
            self.failed = True  # whatever the thread meets later stays silent: one warning
            warn_unreachable(self.name, f"still busy after {CLOSE_WAIT_S:.0f} s at the end of the run")

    def _run(self) -> None:
        tracker = self._guarded(self._open)
        closing = tracker is None
        while not closing:
            rows, closing = self._next_batch()
            if rows and not self._guarded(tracker.log_rows, rows):
                return
        if tracker is not None:
            self._guarded(tracker.close, self._finished)

    def _next_batch(self) -> tuple[list[dict[str, Any]], bool]:
        """The rows queued until FLUSH_EVERY_S after the first one (or the close); whether the close came."""
        item = self._queue.get()
        deadline = time.monotonic() + FLUSH_EVERY_S
        rows: list[dict[str, Any]] = []
        while item is not _CLOSE:
            rows += item
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return rows, False
        return rows, True

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        """call(*args) (True for None), or None after warning once and dropping the tracker when it raises."""
        try:
            return call(*args) or True
        except Exception as exc:  # any failure of a tracker's client: the run goes on without it
            if not self.failed:
                warn_unreachable(self.name, f"{type(exc).__name__}: {_first_line(exc)}")
            self.failed = True
            return None


def warn_unreachable(name: str, why: str) -> None:
    get_logger().warning(
        "run.trackers: %s failed (%s); the run goes on without it: check %s, or drop %s from run.trackers",
        name,
        why,
        SETTINGS.get(name, "its settings"),
        name,
    )


def _first_line(exc: BaseException) -> str:
    """The error's first line, without any user:password@ a URI in it carried."""
    line = (str(exc).strip().splitlines() or [""])[0][:300]
    return re.sub(r"//[^/@\s]+@", "//", line)


def call_bounded(name: str, call: Callable[[], Any], timeout_s: float = CLOSE_WAIT_S) -> Any:
    """call() for a tracker outside the step loop (the driver's, a sweep's): its result, or None after one warning
    when it raises or runs past `timeout_s` (a server retrying for minutes does not hold the command up)."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as exc:  # any failure of a tracker's client: the command goes on without it
            warn_unreachable(name, f"{type(exc).__name__}: {_first_line(exc)}")

    thread = threading.Thread(target=run, name=f"raylm-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        warn_unreachable(name, f"no answer within {timeout_s:.0f} s")
    return result[0] if result else None
