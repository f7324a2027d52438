"""`raylm sweep --resume`: the sweep's recorded config and space, and the refusal to resume a changed one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.config import Config, to_dict
from raylm.errors import ConfigError
from raylm.tune.space import Space

SWEEP_FILE = "sweep.json"  # the config and space a sweep started with: --resume refuses any change to them


def check_resumable(sweep_dir: Path, cfg: Config, space: Space) -> None:
    """--resume needs the sweep's folder and the same config and space it started with (names what differs)."""
    saved_path = sweep_dir / SWEEP_FILE
    if not saved_path.exists() or not (sweep_dir / "tuner.pkl").exists():
        raise ConfigError(
            f"--resume: no sweep to resume in {sweep_dir}; run without --resume to start it, or set "
            f"tune.name to the sweep you mean"
        )
    saved = json.loads(saved_path.read_text())
    for what, old, new in (
        ("config", saved["config"], json.loads(json.dumps(to_dict(cfg)))),
        ("space", saved["space"], json.loads(json.dumps(space.raw))),
    ):
        key = _first_difference(old, new)
        if key is not None:
            raise ConfigError(
                f"--resume: the {what} differs from the one the sweep started with at {key} "
                f"({_at(old, key)!r} then, {_at(new, key)!r} now); resume with the same {what}, or "
                f"start a new sweep with another tune.name"
            )


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def expected_trials(sweep_dir: Path, cfg: Config) -> int:
    """num_samples times the grid points of the space the sweep started with."""
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
    grid = 1
    for spec in saved["space"].values():
        if isinstance(spec, dict) and "grid" in spec:
            grid *= len(spec["grid"])
    return cfg.tune.num_samples * grid
