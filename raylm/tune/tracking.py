"""A sweep in MLflow: one parent run (the base config, the space, the sweep's outputs) with a child run per trial
(each trial's own training run, nested under it) that carries its values, status and ASHA or PBT decisions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.config import Config, to_dict, with_overrides
from raylm.storage.file_names import DECISIONS_FILE
from raylm.train.metrics import read_metrics
from raylm.train.tracking.background import call_bounded
from raylm.train.tracking.base import flatten, run_tags
from raylm.train.tracking.mlflow_run import NAME, client, log_params, open_run, update_run
from raylm.tune.asha import read_decisions

SWEEP_ARTIFACTS = ("trials.jsonl", DECISIONS_FILE, "sweep.md", "sweep.png", "best.yaml")
# a trial's MLflow status from its own (a trial Tune paused, then stopped, never closed its run)
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "diverged": "FAILED", "error": "FAILED"}


def open_sweep_run(cfg: Config, sweep_dir: Path, space: dict[str, Any]) -> Config:
    """With mlflow in run.trackers: the sweep's parent run, created (or continued by --resume), and the config
    whose trials nest under it (tune.parent_run); the config unchanged when MLflow is off or cannot be reached."""
    if NAME not in cfg.run.trackers:
        return cfg
    run_id = call_bounded(NAME, lambda: _open_parent(cfg, sweep_dir, space))
    return with_overrides(cfg, {"tune.parent_run": run_id}) if run_id else cfg


def _open_parent(cfg: Config, sweep_dir: Path, space: dict[str, Any]) -> str:
    tree = to_dict(cfg)
    run_id, _ = open_run(sweep_dir, cfg.tune.name, {**run_tags(tree), "raylm.kind": "sweep"})
    log_params(run_id, flatten(tree))
    client().log_dict(run_id, space, "space.json")
    return run_id


def log_sweep(cfg: Config, sweep_dir: Path) -> None:
    """The sweep's outputs into its parent run, and each trial's values, status and decisions into its run (with
    the rows it lacks)."""
    if cfg.tune.parent_run:
        call_bounded(NAME, lambda: _log_outputs(sweep_dir))


def _log_outputs(sweep_dir: Path) -> None:
    decisions = read_decisions(sweep_dir / DECISIONS_FILE)
    trials = (sweep_dir / "trials.jsonl").read_text().splitlines()
    for trial in map(json.loads, filter(str.strip, trials)):
        own = [d for d in decisions if d.get("trial") == trial["trial_id"]]
        folder = Path(trial["folder"])
        tags = trial_tags(trial, own)
        update_run(folder, rows=read_metrics(folder), tags=tags, status=STATUS.get(trial["status"]))
    present = tuple(sweep_dir / name for name in SWEEP_ARTIFACTS if (sweep_dir / name).exists())
    update_run(sweep_dir, files=present)


def trial_tags(trial: dict[str, Any], decisions: list[dict[str, Any]]) -> dict[str, str]:
    """A trial's values and status, and each decision taken on it (by rung, or in order for PBT's)."""
    tags = {
        "raylm.trial_id": trial["trial_id"],
        "raylm.status": trial["status"],
        "raylm.values": json.dumps(trial["params"], sort_keys=True),
    }
    for i, decision in enumerate(decisions):
        where = f"rung{decision['rung']}" if "rung" in decision else f"decision{i}"
        detail = {k: v for k, v in decision.items() if k != "trial"}
        tags[f"raylm.{where}"] = json.dumps(detail, sort_keys=True)
    return tags
