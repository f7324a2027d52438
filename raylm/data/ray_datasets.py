"""Ray plumbing shared by prepare and stream: a Ray to run on, ordered quiet datasets, task errors as rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from raylm.errors import DataError
from raylm.log import console_is_verbose, quiet_ray_driver_loggers
from raylm.ray_connect import check_ray_address

ERROR_COLUMN = (
    "error"  # a task reports a DataError as a row, so the driver raises one line, not a task traceback
)


@contextmanager
def ray_session() -> Iterator[None]:
    """Use the Ray this process is connected to, or start one (RAY_ADDRESS, else local) and shut it down after."""
    import ray

    started = not ray.is_initialized()
    if started:
        quiet_ray_driver_loggers()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def probe_ray_address() -> None:
    """Fail in seconds, as `raylm train` does, when RAY_ADDRESS names a cluster that does not answer (ray.init
    would retry for minutes); nothing to check when Ray is up already or starts locally."""
    if not ray_is_up():
        check_ray_address()


def ray_is_up() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def ordered(dataset, progress: bool = False):
    """Blocks come out in input order (shards and batches must not depend on which task finished first).

    progress: a live progress bar on a terminal; Ray Data's start-of-execution banners only with run.log_level=debug
    (streams start once per evaluation: they would flood the worker logs too)."""
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = progress
    dataset.context.print_on_execution_start = progress and console_is_verbose()
    return dataset


def errors_as_rows(make_tables: Callable[..., Iterator], error_table: Callable[[str], object]) -> Callable:
    """Wrap a generator UDF: a DataError it raises becomes one final row made by error_table(message)."""

    def run(*args, **kwargs):
        try:
            yield from make_tables(*args, **kwargs)
        except DataError as exc:
            yield error_table(str(exc))

    return run


def raise_if_error(errors) -> None:
    """Raise the first non-empty message of an error column as the DataError it was."""
    for message in errors:
        if message:
            raise DataError(str(message))
