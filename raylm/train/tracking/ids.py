"""A tracker's own record in the run (or sweep) folder: <folder>/trackers/<name>.json, its run id and position.

A restarted worker group and a resumed run read it to continue the same tracker run; a sweep reads its trials'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.storage.atomic import write_json_atomic

TRACKER_FOLDER = "trackers"
RECORDED = ("mlflow", "wandb")  # the trackers that keep a record


def record_name(name: str) -> str:
    """The record's path inside the folder."""
    return f"{TRACKER_FOLDER}/{name}.json"


def tracker_file(folder: Path, name: str) -> Path:
    return Path(folder) / record_name(name)


def read_record(folder: Path, name: str) -> dict[str, Any]:
    """The tracker's record ({} when it never started a run here)."""
    path = tracker_file(folder, name)
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(folder: Path, name: str, record: dict[str, Any]) -> None:
    path = tracker_file(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
