"""MLflow: the resolved config as params, every metrics row's numbers as metrics at their step (log_batch), tags
for layout, version and commit, config.yaml as an artifact; one run per run folder, continued on resume.

The tracking server and credentials come from MLflow's own variables (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN,
...), the experiment from MLFLOW_EXPERIMENT_NAME (default "raylm"); nothing of them is logged or written. The run's
id is kept in <run>/trackers/mlflow.json: a restarted worker group or a resumed run continues that run and skips
the steps it already holds (read back from the server), so no step is logged twice."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from raylm.train.tracking.base import Tracker, finite_numbers, flatten, run_tags
from raylm.train.tracking.ids import read_record, write_record

NAME = "mlflow"
DEFAULT_EXPERIMENT = "raylm"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for a nested run


def client():
    from mlflow import MlflowClient

    return (
        MlflowClient()
    )  # MLFLOW_TRACKING_URI (or MLflow's default) and its credentials, from the environment


class MlflowTracker(Tracker):
    name = NAME

    def __init__(self, run_id: str, logged_through: int):
        self.client = client()
        self.run_id = run_id
        self.logged_through = logged_through  # the last step this MLflow run holds (-1: none)

    @classmethod
    def open(cls, tree: dict[str, Any], folder: Path) -> MlflowTracker:
        """Create the run folder's MLflow run, or continue the one its record names; log its params and tags."""
        tags = run_tags(tree)
        parent = tree["tune"]["parent_run"]
        if parent:
            tags |= {PARENT_TAG: parent, "raylm.sweep": tree["tune"]["trial_of"]}
        run_id, created = open_run(folder, tree["run"]["name"], tags, parent)
        mlflow = client()
        logged_through = -1 if created else last_step(run_id)
        if not created:
            mlflow.update_run(run_id, status="RUNNING")
        log_params(run_id, flatten(tree))
        mlflow.log_text(run_id, yaml.safe_dump(tree, sort_keys=False), "config.yaml")
        return cls(run_id, logged_through)

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        fresh = [row for row in rows if row["step"] > self.logged_through]
        metrics = [
            Metric(key, value, int(row.get("time", time.time()) * 1000), row["step"])
            for row in fresh
            for key, value in finite_numbers(row).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)  # MLflow splits it into requests of 1000
            self.logged_through = fresh[-1]["step"]

    def close(self, finished: bool) -> None:
        if finished:
            self.client.set_terminated(self.run_id, "FINISHED")


def open_run(folder: Path, run_name: str, tags: dict[str, str], parent: str = "") -> tuple[str, bool]:
    """The id of the folder's MLflow run (created now, in the parent's experiment if any, else the configured
    one) and whether it was created now; its tags set either way (a resume may change the layout)."""
    from mlflow.entities import RunTag

    mlflow = client()
    record = read_record(folder, NAME)
    created = not record
    if created:
        experiment = mlflow.get_run(parent).info.experiment_id if parent else experiment_id()
        run = mlflow.create_run(experiment, run_name=run_name, tags=tags)
        record = {"run_id": run.info.run_id, "experiment_id": experiment}
        write_record(folder, NAME, record)
    else:
        mlflow.log_batch(record["run_id"], tags=[RunTag(k, v) for k, v in tags.items()])
    return record["run_id"], created


def experiment_id() -> str:
    """MLFLOW_EXPERIMENT_ID, or the experiment named MLFLOW_EXPERIMENT_NAME (default "raylm"), created if new."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    mlflow = client()
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else mlflow.create_experiment(name)


def log_params(run_id: str, params: dict[str, str]) -> None:
    """The params the run lacks (MLflow params never change: a resumed run keeps those it started with)."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    mlflow = client()
    held = mlflow.get_run(run_id).data.params
    fresh = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items() if k not in held]
    if fresh:
        mlflow.log_batch(run_id, params=fresh)


def last_step(run_id: str) -> int:
    """The highest step of any metric the run holds (-1: none)."""
    mlflow = client()
    keys = mlflow.get_run(run_id).data.metrics
    return max((m.step for key in keys for m in mlflow.get_metric_history(run_id, key)), default=-1)


def update_run(
    folder: Path,
    rows: list[dict[str, Any]] | None = None,
    tags: dict[str, str] | None = None,
    files: tuple[Path, ...] = (),
    under: str | None = None,
    status: str | None = None,
) -> bool:
    """The folder's MLflow run after its training ended: the rows of its metrics.jsonl it lacks (queued when a
    worker was killed: a trial Tune paused, then stopped), tags, artifacts (files or folders; under `under`),
    its final status. False when the folder has none."""
    from mlflow.entities import RunTag

    record = read_record(folder, NAME)
    if not record:
        return False
    run_id = record["run_id"]
    mlflow = client()
    if rows:
        MlflowTracker(run_id, last_step(run_id)).log_rows(rows)
    if tags:
        mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for path in files:
        if Path(path).is_dir():
            mlflow.log_artifacts(run_id, str(path), under)
        else:
            mlflow.log_artifact(run_id, str(path), under)
    if status:
        mlflow.set_terminated(run_id, status)
    return True
