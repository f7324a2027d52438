"""Logging for the driver and every rank: raylm's own lines, and a console that shows them and real warnings only.

Rank 0 prints progress, other ranks only warnings and errors. By default the driver's console keeps, of everything
Ray forwards from its workers and actors, raylm's own lines (without Ray's prefix) and warnings or errors that are
not known noise; `run.log_level=debug` (`--verbose`) shows every line. Worker logs on disk stay complete either way
(`/tmp/ray/session_latest/logs/`, one file per worker).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

LOGGER_NAME = "raylm"
LOG_LEVELS = ("info", "debug")  # run.log_level: info = raylm's lines and real warnings; debug = every line

_console = {"verbose": False}

# A raylm line as setup_logging formats it; Ray forwards it as "(RayTrainWorker pid=...) [raylm r0] ...".
RAYLM_LINE = re.compile(r"\[raylm r\d+\] ")
# Python logging and warnings (WARNING, UserWarning:, ...), DeepSpeed's "[WARNING]", and Ray's C++ log lines at
# warning, error or fatal level ("[2026-01-01 00:00:00,000 E 123 456] file.cc:10: ...").
WARNING_LINE = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|\b\w*(Warning|Error|Exception):|^Traceback"
    r"|^\[[\d-]+ [\d:,.]+ [WEF] \d+ \d+\]"
)
# Warnings that are not news to a raylm user, each with the reason it is safe to hide. Still written to disk.
KNOWN_NOISE = (
    # Ray Train v2 starts this actor of its own; Ray's core worker logs a restart caveat about it at error level.
    re.compile(r"Actor with class name: 'PreemptionWatcher'"),
    # DeepSpeed on a CPU-only node, where raylm runs it on purpose (gloo, CPU accelerator).
    re.compile(r"Setting accelerator to CPU"),
    # Ray 2.60 turns token authentication on for a local Ray: the notice says so on every start.
    re.compile(r"Token authentication is enabled for this Ray cluster"),
)


def get_logger() -> logging.Logger:
    """The project's logger (configure it once with `setup_logging`)."""
    return logging.getLogger(LOGGER_NAME)


def current_rank() -> int:
    """This process's global rank from the torch.distributed environment (0 outside a process group)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(rank: int | None = None, verbose: bool = False) -> logging.Logger:
    """Log to stderr; INFO on rank 0 (DEBUG with verbose), WARNING elsewhere, each line tagged with the rank."""
    rank = current_rank() if rank is None else rank
    _console["verbose"] = verbose
    logger = get_logger()
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    logger.setLevel(level)
    if not any(getattr(h, "_raylm", False) for h in logger.handlers):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler._raylm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for handler in logger.handlers:
        if getattr(handler, "_raylm", False):
            handler.setFormatter(logging.Formatter(f"[raylm r{rank}] %(message)s"))
    logger.propagate = False
    return logger


def console_is_verbose() -> bool:
    """Whether this process was set up to show every line (run.log_level=debug or --verbose)."""
    return _console["verbose"]


def keep_on_console(line: str) -> bool:
    """A forwarded worker line the default console shows: raylm's own, or a warning or error that is not noise."""
    if RAYLM_LINE.search(line):
        return True
    return bool(WARNING_LINE.search(line)) and not any(noise.search(line) for noise in KNOWN_NOISE)


def split_for_console(batch: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A Ray log batch's lines to show: (raylm's own, printed bare; other kept lines, printed with Ray's prefix)."""
    kept = [line for line in batch.get("lines", []) if keep_on_console(line)]
    own = [line for line in kept if RAYLM_LINE.search(line)]
    return own, [line for line in kept if not RAYLM_LINE.search(line)]


def quiet_ray_driver_loggers() -> None:
    """On the driver, before ray.init and unless verbose: Ray's, Ray Train's and Ray Data's console lines to
    warnings, and Ray's notice that a local Ray has token authentication on (it says so at every start) off."""
    if console_is_verbose():
        return
    for name in ("ray", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _quiet_ray_data_console()


def _quiet_ray_data_console() -> None:
    """Ray Data logs to a file in the session folder and to the console: its console handler to warnings, so its
    executor banners and progress snapshots stay in the file only."""
    try:
        import ray.data  # noqa: F401  (sets up the "ray.data" logger and its handlers on import)
    except ImportError:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)


def filter_forwarded_logs() -> None:
    """On the driver, after ray.init and unless verbose: of the lines Ray forwards from workers and actors, print
    only those keep_on_console keeps."""
    if not console_is_verbose():
        _swap_ray_log_printer()


def _swap_ray_log_printer() -> None:
    """Swap Ray's driver-side printer of worker lines for one that prints only what keep_on_console keeps.

    A Ray internal (`ray._private.worker`): Ray has no public filter of forwarded lines on the driver alone
    (docs/private-apis.md); tests/unit/test_private_api_canary.py fails if an upgrade moves it."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        printer: Callable = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray layout: keep its console as it is
        return
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return  # ray.init(log_to_driver=False): nothing is forwarded

    def print_kept(batch: dict[str, Any]) -> None:
        own, other = split_for_console(batch)
        if own:
            printer({**batch, "lines": own}, ignore_prefix=True)
        if other:
            printer({**batch, "lines": other}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_kept)


def quiet_worker_logs() -> None:
    """Inside a training worker: no progress bars in the log files. Libraries keep their log levels, so the files
    on disk stay complete."""
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:  # outside Ray, nothing to quiet
        pass
