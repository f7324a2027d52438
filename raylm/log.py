"""One rank-aware logger: rank 0 prints progress, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "raylm"


def get_logger() -> logging.Logger:
    """The project's logger (configure it once with `setup_logging`)."""
    return logging.getLogger(LOGGER_NAME)


def current_rank() -> int:
    """This process's global rank from the torch.distributed environment (0 outside a process group)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(rank: int | None = None, verbose: bool = False) -> logging.Logger:
    """Log to stderr; INFO on rank 0 (DEBUG with verbose), WARNING elsewhere, each line tagged with the rank."""
    rank = current_rank() if rank is None else rank
    logger = get_logger()
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    logger.setLevel(level)
    if not any(getattr(h, "_raylm", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._raylm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for handler in logger.handlers:
        if getattr(handler, "_raylm", False):
            handler.setFormatter(logging.Formatter(f"[raylm r{rank}] %(message)s"))
    logger.propagate = False
    return logger


# Loggers whose per-report and per-dataset INFO lines drown the progress line inside a training worker.
CHATTY_WORKER_LOGGERS = ("ray.train", "ray.data", "deepspeed", "DeepSpeed")


def quiet_worker_logs() -> None:
    """Inside a training worker, keep Ray Train, Ray Data and DeepSpeed to warnings; raylm prints progress."""
    for name in CHATTY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except ImportError:  # outside Ray, nothing to quiet
        pass
