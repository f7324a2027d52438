"""A finished (or interrupted) sweep read back from its trial folders: trials.jsonl, best.yaml and the summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from raylm.config import Config, load_config, to_dict
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.storage.file_names import CONFIG_FILE
from raylm.train.metrics import read_metrics
from raylm.tune.asha import read_decisions
from raylm.tune.plan import SweepPlan, best_config

TRIAL_FILE = (
    "trial.json"  # written in each trial's run folder when it starts: id, name, values, its Tune actor
)


@dataclass
class TrialRecord:
    """One line of trials.jsonl."""

    name: str
    trial_id: str
    folder: str
    params: dict
    status: str  # finished | stopped | diverged | error | unfinished
    tokens: int
    steps: int
    last: float | None
    best: float | None
    rungs: dict[str, float | None]
    wall_s: float
    error: str | None = None


def finite(value: Any) -> float | None:
    """NaN and infinities are never written into JSON: they become null."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def collect_trials(
    trials_dir: Path, decisions_path: Path, plan: SweepPlan, errors: dict[str, str]
) -> list[TrialRecord]:
    """Every trial folder with its status; `errors` maps a trial id to the first line of its error."""
    stopped = {row["trial"] for row in read_decisions(decisions_path) if row["action"] == "stop"}
    records = []
    for info_path in sorted(trials_dir.glob(f"*/{TRIAL_FILE}")):
        info = json.loads(info_path.read_text())
        rows = read_metrics(info_path.parent)
        records.append(_record(info, info_path.parent, rows, plan, stopped, errors.get(info["trial_id"])))
    return records


def _record(info: dict, folder: Path, rows: list[dict], plan: SweepPlan, stopped: set, error: str | None):
    evals = [r for r in rows if finite(r.get("val_loss")) is not None]
    last_row = rows[-1] if rows else {}
    tokens = last_row.get("tokens", 0)
    if error:
        status = "error"
    elif any(r.get("diverged") for r in rows):
        status = "diverged"
    elif info["trial_id"] in stopped:
        status = "stopped"
    else:
        status = "finished" if tokens >= plan.budget_tokens else "unfinished"
    wall_s = (last_row["time"] - rows[0]["time"] + rows[0]["step_s"]) if rows else 0.0
    return TrialRecord(
        name=info["trial_name"],
        trial_id=info["trial_id"],
        folder=str(folder),
        params=info["params"],
        status=status,
        tokens=tokens,
        steps=last_row.get("step", -1) + 1,
        last=finite(evals[-1]["val_loss"]) if evals and status != "diverged" else None,
        best=min((r["val_loss"] for r in evals), default=None) if status != "diverged" else None,
        rungs={str(r["rung_tokens"]): finite(r.get("val_loss")) for r in rows if "rung_tokens" in r},
        wall_s=round(wall_s, 3),
        error=error,
    )


def write_trials(records: list[TrialRecord], path: Path) -> None:
    path.write_text("".join(json.dumps(vars(record)) + "\n" for record in records))


def pick_best(records: list[TrialRecord]) -> TrialRecord | None:
    """The lowest final metric among trials that trained the whole budget (never a diverged or stopped one)."""
    done = [r for r in records if r.status == "finished" and r.last is not None]
    return min(done, key=lambda r: cast(float, r.last)) if done else None  # `done` has every last set


def write_best(best: TrialRecord, base: Config, sweep_dir: Path) -> Path:
    """best.yaml: the best trial's own resolved config (its derived max_steps kept) as a plain run config."""
    trial_cfg = load_config(Path(best.folder) / CONFIG_FILE)
    out = sweep_dir / "best.yaml"
    out.write_text(yaml.safe_dump(to_dict(best_config(trial_cfg, base)), sort_keys=False))
    return out


def summarise(base: Config, records: list[TrialRecord], sweep_dir: Path) -> dict[str, Any]:
    best = pick_best(records)
    if best is None:
        raise RaylmError(
            f"no trial of sweep {base.tune.name!r} trained its whole budget with a finite "
            f"{base.tune.metric}; see {sweep_dir}/trials.jsonl"
        )
    best_path = write_best(best, base, sweep_dir)
    counts = {
        status: sum(r.status == status for r in records)
        for status in ("finished", "stopped", "diverged", "error", "unfinished")
    }
    get_logger().info(
        "sweep %s: %s; best %s=%.4f (%s) with %s; %s",
        base.tune.name,
        counts,
        base.tune.metric,
        best.last,
        best.name,
        best.params,
        best_path,
    )
    best_summary = {
        "name": best.name,
        "trial_id": best.trial_id,
        "params": best.params,
        base.tune.metric: best.last,
    }
    return {
        "sweep_dir": str(sweep_dir),
        "trials": len(records),
        "status": counts,
        "best": best_summary,
        "best_yaml": str(best_path),
    }
