"""Connect to the Ray cluster in RAY_ADDRESS (failing fast when it does not answer) or start a local one.

The ground floor's one reader of RAY_ADDRESS: `raylm train`, `raylm sweep` and prepare all go through it."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from raylm.errors import RaylmError
from raylm.log import console_is_verbose, filter_forwarded_logs, get_logger, quiet_ray_driver_loggers

CONNECT_TIMEOUT_S = 10.0
LOCAL_HEALTH_CHECK_S = "0.5"
LOCAL_DASHBOARD_HOST = "127.0.0.1"  # never a public interface
# Ray waits 30 s by default; a healthy rank destroys its process group in well under 1 s
PG_SHUTDOWN_WAIT_S = "5"
PG_SHUTDOWN_WAIT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # read by Ray's torch backend at a shutdown
# Ray Train's preemption watcher (one more actor per run) asks whether a node is draining: a local Ray's one node
# never is
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

_started = {"local_without_dashboard": False}  # what this process's connect_ray started


def job_env_vars() -> dict[str, str]:
    """The environment raylm adds to its Ray job (on a cluster ray.init's runtime_env; a local Ray inherits it from
    the driver's environment), which every actor inherits: Ray
    Train's controller then waits PG_SHUTDOWN_WAIT_S for the workers to leave their process group before a
    restart (a stalled, SIGSTOPped rank never answers, and each second of that wait delays the restart).

    A value already in the driver's environment is left alone: a local Ray inherits the driver's environment,
    and a submitted job's runtime_env already carries it (Ray refuses a variable set twice)."""
    return {} if PG_SHUTDOWN_WAIT_ENV in os.environ else {PG_SHUTDOWN_WAIT_ENV: PG_SHUTDOWN_WAIT_S}


def job_runtime_env() -> dict | None:
    """ray.init's runtime_env for raylm's job: job_env_vars, or None when there are none to add."""
    env_vars = job_env_vars()
    return {"env_vars": env_vars} if env_vars else None


def connect_ray(connect_timeout_s: float = CONNECT_TIMEOUT_S, dashboard: bool = False) -> None:
    """ray.init against RAY_ADDRESS, or a local single-node Ray (token authentication as default), with
    raylm's job environment (job_env_vars); the console then shows raylm's lines and real warnings unless
    run.log_level=debug (raylm/log.py).

    dashboard: start a local Ray with its dashboard, on 127.0.0.1 (`raylm sweep`): Ray Train's placement-group
    cleaner asks the state API behind it whether a controller died, and without it the resources of a trial Tune
    stopped early are never released. `raylm train` goes without: its local Ray ends with its driver, and the
    dashboard's ten processes wake about 350 times a second, each wake-up stalling the training step's intra-op
    threads on a small CPU node (docs/ray-facts.md 4)."""
    import ray

    address = ray_address()
    remote = is_remote(address)
    check_ray_address(connect_timeout_s)  # a bad address is the user's error even when Ray is already up
    if ray.is_initialized():
        return
    log = get_logger()
    quiet_ray_driver_loggers()
    ray_log_level = logging.INFO if console_is_verbose() else logging.WARNING  # Ray's own driver lines
    if remote:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(
            address=address, log_to_driver=True, logging_level=ray_log_level, runtime_env=job_runtime_env()
        )
    else:
        log.info("starting a local Ray (no RAY_ADDRESS set)")
        # A local Ray's processes inherit this environment, so the job's variables go there rather than in a
        # runtime_env: actors then start in the worker processes Ray has already started (a worker with a
        # runtime_env of its own is started afresh, through the runtime-env agent).
        os.environ.update(job_env_vars())
        # ray.train.report waits for the controller's next poll; a local cluster can afford to poll often.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_S)
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        shown: dict[str, Any] = {"dashboard_host": LOCAL_DASHBOARD_HOST} if dashboard else {}
        ray.init(include_dashboard=dashboard, log_to_driver=True, logging_level=ray_log_level, **shown)
        _started["local_without_dashboard"] = not dashboard
    filter_forwarded_logs()


def placement_group_cleaner_works() -> bool:
    """Whether Ray Train's placement-group cleaner can do its work here: not on a local Ray this process started
    without its dashboard, whose state API it asks every second in vain (and that Ray ends with this process,
    placement groups and all)."""
    return not _started["local_without_dashboard"]


def ray_address() -> str:
    """RAY_ADDRESS as raylm reads it: '' or 'local' start a local Ray, 'auto' finds a running one, else
    host:port."""
    return os.environ.get("RAY_ADDRESS", "").strip()


def is_remote(address: str) -> bool:
    """True when `address` names a cluster to join rather than a local Ray to start."""
    return address not in ("", "local")


def check_ray_address(timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds when RAY_ADDRESS names a cluster that does not answer (ray.init would retry for
    minutes); nothing to check when it is unset, 'local' or 'auto'."""
    address = ray_address()
    if is_remote(address) and address != "auto":
        probe_address(address, timeout_s)


def probe_address(address: str, timeout_s: float) -> None:
    """Open a TCP connection to the head first: ray.init would otherwise retry for minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RaylmError(
            f"RAY_ADDRESS={address!r} is not host:port (e.g. 10.0.0.1:6379 or ray://head:10001); "
            f"fix it or unset RAY_ADDRESS to start a local Ray"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RaylmError(
            f"no Ray cluster answers at RAY_ADDRESS={address} ({exc.strerror or exc}); start one with "
            f"`ray start --head` or unset RAY_ADDRESS to run on a local Ray"
        ) from None
