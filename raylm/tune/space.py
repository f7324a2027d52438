"""Search spaces: a tune_spaces YAML (dotted config key -> distribution) turned into a Ray Tune param_space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raylm.config import Config, with_overrides
from raylm.config.loader import describe_fields
from raylm.errors import ConfigError

# distribution name -> (number of arguments, how to build it)
DISTRIBUTIONS = {
    "choice": "a list of values",
    "grid": "a list of values, every one tried",
    "uniform": "[low, high]",
    "loguniform": "[low, high], low > 0",
    "randint": "[low, high) integers",
}


def load_space(path: str | Path, base: Config) -> dict[str, Any]:
    """Read a space file and check every key exists and every listed value makes a valid config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist; pass a file such as tune_spaces/lr_batch.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path} must map dotted config keys to distributions, e.g. optim.lr: "
                          f"{{loguniform: [1e-4, 1e-2]}}")
    known = {name for name, _, _ in describe_fields()}
    space = {}
    for key, spec in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: {key!r} is not a config key; `raylm config --help` lists them")
        space[key] = _distribution(path, key, spec)
        _check_values(base, key, spec)
    return space


def _distribution(path: Path, key: str, spec: Any):
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        kinds = ", ".join(f"{name}: {args}" for name, args in DISTRIBUTIONS.items())
        raise ConfigError(f"{path}: {key} must be one of {{{kinds}}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args or (kind not in ("choice", "grid") and len(args) != 2):
        raise ConfigError(f"{path}: {key}: {kind} takes {DISTRIBUTIONS[kind]}; got {args!r}")
    if kind == "loguniform" and float(args[0]) <= 0:
        raise ConfigError(f"{path}: {key}: loguniform needs low > 0; got {args[0]}")
    build = {"choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args),
             "uniform": lambda: tune.uniform(float(args[0]), float(args[1])),
             "loguniform": lambda: tune.loguniform(float(args[0]), float(args[1])),
             "randint": lambda: tune.randint(int(args[0]), int(args[1]))}
    return build[kind]()


def _check_values(base: Config, key: str, spec: dict) -> None:
    """Listed values (and range ends) must each give a valid config, so no trial fails on validation later."""
    kind, args = next(iter(spec.items()))
    values = args if kind in ("choice", "grid") else args[:1] if kind == "randint" else args
    for value in values:
        with_overrides(base, {key: value})
