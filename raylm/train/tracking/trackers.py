"""run.trackers opened for rank 0: TensorBoard in-line, MLflow and W&B each on its own thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylm.train.tracking.background import BackgroundTracker
from raylm.train.tracking.base import Tracker
from raylm.train.tracking.tensorboard import TensorBoardTracker


def open_trackers(tree: dict[str, Any], folder: Path, start_step: int, rerun: bool) -> list[Tracker]:
    """The trackers `tree["run"]["trackers"]` names, for the run whose local folder is `folder`, (re)started at
    `start_step` (`rerun`: an earlier attempt logged rows there)."""
    opened: list[Tracker] = []
    for name in tree["run"]["trackers"]:
        if name == "tensorboard":
            opened.append(TensorBoardTracker(folder, start_step, rerun))
        elif name == "mlflow":
            from raylm.train.tracking.mlflow_run import MlflowTracker

            opened.append(BackgroundTracker(name, lambda: MlflowTracker.open(tree, folder)))
        elif name == "wandb":
            from raylm.train.tracking.wandb_run import WandbTracker

            opened.append(BackgroundTracker(name, lambda: WandbTracker.open(tree, folder)))
    return opened
