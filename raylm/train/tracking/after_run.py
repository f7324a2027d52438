"""What reaches a run's MLflow run after its training: the rows it lacks and the driver's loss.png, and an export
made from the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylm.storage.location import Location, as_location, is_remote, local_view
from raylm.train.run_folder import checkpoint_root
from raylm.train.tracking.background import call_bounded
from raylm.train.tracking.ids import read_record
from raylm.train.tracking.mlflow_run import NAME, update_run

EXPORT_ARTIFACTS = "export"  # the artifact folder an export goes under


def add_artifacts(
    folder: Path, files: tuple[Path, ...], under: str | None = None, rows: list[dict[str, Any]] | None = None
) -> None:
    """Files (or folders) into the MLflow run of the run folder `folder` (local), when it has one, after the
    metrics.jsonl `rows` it lacks."""
    if read_record(folder, NAME):
        call_bounded(NAME, lambda: update_run(folder, rows=rows, files=files, under=under))


def add_export(source: str, out_dir: str) -> None:
    """An export written from a local run folder, or from a checkpoint inside one, into that run's MLflow run."""
    location = as_location(source, "RUN_OR_CHECKPOINT")
    if is_remote(location):
        return  # a run on object storage: its tracker record is in its prefix, not read here
    run = _run_of(location)
    if run is not None:
        add_artifacts(run, (local_view(as_location(out_dir, "OUT_DIR")),), EXPORT_ARTIFACTS)


def _run_of(checkpoint_or_run: Location) -> Path | None:
    """The run folder of a run folder or of one of its checkpoints; None for anything else."""
    path = Path(str(checkpoint_or_run)).resolve()
    if read_record(path, NAME):
        return path
    run = path.parent.parent
    return run if checkpoint_root(run) == path.parent and read_record(run, NAME) else None
