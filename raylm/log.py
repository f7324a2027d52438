"""Logging for the driver and every rank: raylm's own lines, and a console that shows only those.

Rank 0 prints progress, other ranks only warnings and errors. By default the driver's console shows, of
everything Ray forwards from its workers and actors, raylm's own lines (printed bare, without Ray's prefix, colour
or de-duplication) and the autoscaler's word that the cluster cannot place a request; Ray's, DeepSpeed's and
torch's lines stay in the worker log files on disk (`/tmp/ray/session_latest/logs/`, one file per worker).
`run.log_level=debug` (`--verbose`) shows every line. No ANSI colour codes when stdout is not a terminal.
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
RAYLM_LINE = re.compile(r"^\[raylm r\d+\] ")
# Every line of raylm's default console: its log lines, the CLI's error line, a verb's JSON summary on stdout.
CONSOLE_LINE = re.compile(r"^(\[raylm r\d+\] |raylm: error: |\{\")")
AUTOSCALER = "autoscaler"  # the pid Ray gives the autoscaler's lines ("... cannot be scheduled right now")


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
    """A forwarded worker line the default console shows: raylm's own."""
    return bool(RAYLM_LINE.match(line))


def split_for_console(batch: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A Ray log batch's lines to show: (raylm's own, printed bare; the autoscaler's, printed with its prefix)."""
    lines = batch.get("lines", [])
    if batch.get("pid") == AUTOSCALER:
        return [], list(lines)
    return [line for line in lines if keep_on_console(line)], []


def quiet_ray_driver_loggers() -> None:
    """On the driver, before ray.init: no colour codes in Ray's prefixes when stdout is not a terminal; unless
    verbose, Ray's, Ray Train's and Ray Data's console lines to warnings, and Ray's notice that a local Ray has token
    authentication on (it says so at every start) off."""
    no_colour_when_piped()
    if console_is_verbose():
        return
    for name in ("ray", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _quiet_ray_data_console()


def no_colour_when_piped() -> None:
    """No ANSI colour codes in Ray's prefixes of forwarded lines when stdout is not a terminal (a file, a pipe)."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray's printer at every line


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
    only raylm's and the autoscaler's (split_for_console)."""
    if not console_is_verbose():
        _swap_ray_log_printer()


def _swap_ray_log_printer() -> None:
    """Swap Ray's driver-side printer of forwarded lines for one that prints raylm's lines as they are (Ray's printer
    would colour them and fold lines that differ only in a number, the rank, into one with a hint) and the
    autoscaler's through Ray's printer. Both paths go through it: the `ray_print_logs` handler of worker and actor
    lines, and the raylet's messages to the driver ("N PYTHON worker processes have been started", "A worker died"),
    which Ray's `listen_error_messages` prints by calling `print_to_stdstream` by name.

    Ray internals (`ray._private.worker`): Ray has no public filter of forwarded lines on the driver alone
    (docs/private-apis.md); tests/unit/test_private_api_canary.py fails if an upgrade moves them."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        printer: Callable = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray layout: keep its console as it is
        return
    if getattr(printer, "_raylm", False):
        return  # swapped already
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return  # ray.init(log_to_driver=False): nothing is forwarded

    def print_kept(data: dict[str, Any], ignore_prefix: bool = False) -> None:  # Ray's printer's signature
        own, autoscaler = split_for_console(data)
        for line in own:
            print(line, file=sys.stderr, flush=True)
        if autoscaler:
            printer({**data, "lines": autoscaler}, ignore_prefix=False)

    print_kept._raylm = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_kept
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
