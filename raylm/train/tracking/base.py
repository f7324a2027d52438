"""The interface every tracker implements, and the row, config and run-identity shapes they share."""

from __future__ import annotations

import math
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import raylm


class Tracker:
    """One destination of the run's metrics rows (rank 0 only). Rows arrive in metrics.jsonl's order, each step
    once per attempt; a tracker that outlives restarts skips the steps it already holds."""

    name = "tracker"

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """The rows metrics.jsonl kept from earlier attempts, at a (re)start: a tracker whose own record may lack
        some (rows still queued when a SIGKILL ended the attempt) sends those it does not hold yet."""

    def close(self, finished: bool) -> None:
        """End this attempt; `finished`: the loop ran to its end (not a crash, not an interrupted attempt)."""


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """A row's numeric fields but `step`, as floats (booleans as 0/1; null and text left out)."""
    return {
        key: float(value) for key, value in row.items() if key != "step" and isinstance(value, (int, float))
    }


def finite_numbers(row: dict[str, Any]) -> dict[str, float]:
    """numbers(row) without NaN or infinities (which some trackers refuse)."""
    return {key: value for key, value in numbers(row).items() if math.isfinite(value)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys, the way overrides name them: {"parallel.pp": "2", ...}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def layout_text(parallel: dict[str, Any]) -> str:
    """`pp=2 tp=1 dp=2 zero=1`: the layout tag of a run (from its config's parallel section)."""
    return f"pp={parallel['pp']} tp={parallel['tp']} dp={parallel['dp']} zero={parallel['zero_stage']}"


def run_tags(tree: dict[str, Any]) -> dict[str, str]:
    """What every tracker tags a run with: layout, raylm version, the git commit of raylm's checkout when known."""
    tags = {"raylm.layout": layout_text(tree["parallel"]), "raylm.version": raylm.__version__}
    commit = git_commit()
    if commit:
        tags["raylm.git_commit"] = commit
    return tags


@cache
def git_commit() -> str | None:
    """The commit of the git checkout raylm runs from; None for an installed package or without git."""
    git = shutil.which("git")
    source = Path(raylm.__file__).resolve().parent.parent
    if git is None or not (source / ".git").exists():
        return None
    try:
        out = subprocess.run(  # noqa: S603  git at its full path, fixed arguments
            [git, "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
