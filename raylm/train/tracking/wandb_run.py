"""Weights & Biases: the resolved config, every metrics row's numbers at their step, the run tags; one W&B run per
run folder, continued on resume.

Project, entity, mode (WANDB_MODE=offline writes the run under WANDB_DIR for `wandb sync`) and credentials come
from the WANDB_* variables; nothing of them is logged or written by raylm. Its files go under WANDB_DIR, or the run
folder when unset. A sweep's trials share the sweep's name as their W&B group. The run's id and the last step sent
are kept in <run>/trackers/wandb.json: a resumed run continues that run past that step."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from raylm.train.tracking.base import Tracker, finite_numbers, run_tags
from raylm.train.tracking.ids import read_record, write_record

NAME = "wandb"
DEFAULT_PROJECT = "raylm"


class WandbTracker(Tracker):
    name = NAME

    def __init__(self, run, folder: Path, record: dict[str, Any]):
        self.run, self.folder, self.record = run, folder, record

    @classmethod
    def open(cls, tree: dict[str, Any], folder: Path) -> WandbTracker:
        import wandb

        record = read_record(folder, NAME) or {"run_id": uuid.uuid4().hex[:12], "logged_through": -1}
        write_record(folder, NAME, record)
        tags = run_tags(tree)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            id=record["run_id"],
            name=tree["run"]["name"],
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(folder),
            group=tree["tune"]["trial_of"] or None,
            config={**tree, "tags": tags},
            tags=[f"{key}={value}" for key, value in tags.items()],
            settings=wandb.Settings(silent=True, console="off"),
        )
        return cls(run, folder, record)

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        fresh = [row for row in rows if row["step"] > self.record["logged_through"]]
        for row in fresh:
            self.run.log(finite_numbers(row), step=row["step"])
        if fresh:
            self.record["logged_through"] = fresh[-1]["step"]
            write_record(self.folder, NAME, self.record)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
