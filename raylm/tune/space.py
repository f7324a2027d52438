"""Search spaces: a tune_spaces YAML (dotted config key -> distribution) parsed and checked, before Ray starts.

A key maps to one distribution, optionally with `when:` naming the values of other keys under which it applies:
`schedule.lr.decay_frac: {uniform: [0.1, 0.4], when: {schedule.lr.kind: wsd}}`."""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raylm.config.loader import describe_fields
from raylm.errors import ConfigError

DISTRIBUTIONS = {
    "choice": "a non-empty list of values",
    "grid": "a non-empty list of values, every one tried",
    "uniform": "[low, high] numbers, low < high",
    "loguniform": "[low, high] numbers, 0 < low < high",
    "randint": "[low, high) integers, low < high",
}
SWEEP_OWNED = ("run.", "tune.", "checkpoint.resume")  # the sweep sets these for its trials


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution, arguments and the conditions under which it applies."""

    key: str
    kind: str
    args: list
    when: dict[str, list]

    def ends(self) -> list:
        """The values to validate: every listed value, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return [self.args[0], self.args[1] - 1] if self.kind == "randint" else list(self.args)

    def to_tune(self):
        from ray import tune

        low, high = self.args[0], self.args[-1]
        return {
            "choice": lambda: tune.choice(self.args),
            "grid": lambda: tune.grid_search(self.args),
            "uniform": lambda: tune.uniform(low, high),
            "loguniform": lambda: tune.loguniform(low, high),
            "randint": lambda: tune.randint(low, high),
        }[self.kind]()


@dataclass(frozen=True)
class Space:
    path: str
    raw: dict
    params: list[Param]

    def param_space(self) -> dict[str, Any]:
        return {p.key: p.to_tune() for p in self.params}

    def grid_points(self) -> int:
        return math.prod(len(p.args) for p in self.params if p.kind == "grid")

    def searched(self, key: str) -> bool:
        return any(p.key == key for p in self.params)


def active_params(space_raw: dict, params: dict[str, Any]) -> dict[str, Any]:
    """The sampled values whose `when:` conditions hold for the other sampled values (the rest are dropped)."""
    active = {}
    for key, value in params.items():
        when = (space_raw.get(key) or {}).get("when") or {}
        if all(params.get(other) in _as_list(allowed) for other, allowed in when.items()):
            active[key] = value
    return active


def load_space(path: str | Path) -> Space:
    """Read and check a space file: keys, distributions, bounds and conditions (combinations: see space_check)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"search space {path} does not exist; pass a file such as tune_spaces/lr_schedule.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path} must map dotted config keys to distributions, e.g. optim.lr: "
            f"{{loguniform: [1e-4, 1e-2]}}"
        )
    known = sorted(name for name, _, _ in describe_fields())
    params = [_param(path, str(key), spec, known) for key, spec in raw.items()]
    for param in params:
        for other in param.when:
            if other not in raw:
                raise ConfigError(
                    f"{path}: {param.key}: `when` names {other}, which the space does not search; "
                    f"add {other} to the space or drop the condition"
                )
    return Space(path=str(path), raw=raw, params=params)


def _param(path: Path, key: str, spec: Any, known: list[str]) -> Param:
    if key not in known:
        close = closest_key(key, known)
        hint = f"did you mean {close}?" if close else "`raylm config --help` lists the keys"
        raise ConfigError(f"{path}: {key!r} is not a config key; {hint}")
    if key.startswith(SWEEP_OWNED):
        raise ConfigError(
            f"{path}: {key} is set by the sweep itself (run.*, tune.*, checkpoint.resume); "
            f"set it on the command line instead, or drop it from the space"
        )
    spec = dict(spec) if isinstance(spec, dict) else spec
    when = spec.pop("when", {}) if isinstance(spec, dict) else {}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        kinds = ", ".join(DISTRIBUTIONS)
        raise ConfigError(
            f"{path}: {key}: {spec!r} is not one distribution; use one of {kinds}, "
            f"e.g. {key}: {{choice: [a, b]}}"
        )
    if not isinstance(when, dict):
        raise ConfigError(
            f"{path}: {key}: when must map keys to values, e.g. when: {{schedule.lr.kind: wsd}}"
        )
    kind, args = next(iter(spec.items()))
    return Param(
        key=key,
        kind=kind,
        args=_checked_args(path, key, kind, args),
        when={other: _as_list(allowed) for other, allowed in when.items()},
    )


def closest_key(key: str, known: list[str]) -> str | None:
    """The known key the user most likely meant: an abbreviation in the same section (learning_rate -> lr) first,
    else the closest spelling."""
    section, _, leaf = key.rpartition(".")
    initials = "".join(word[:1] for word in leaf.split("_"))
    for candidate in known:
        if candidate.rpartition(".")[0] == section and candidate.rpartition(".")[2] == initials:
            return candidate
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return close[0] if close else None


def _checked_args(path: Path, key: str, kind: str, args: Any) -> list:
    where = f"{path}: {key}: {kind}"
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} takes {DISTRIBUTIONS[kind]}; got {args!r}")
        return args
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where} takes {DISTRIBUTIONS[kind]}; got {args!r}")
    numbers = [_number(where, value, integer=kind == "randint") for value in args]
    low, high = numbers
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}; swap or widen the range")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low {low} must be > 0 for a log scale; e.g. [1.0e-4, {high}]")
    return numbers


def _number(where: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML reads 3e-4 (no dot) as a string
            value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: bound {value!r} is not {kind}; write e.g. [1.0e-4, 1.0e-2]")
    return int(value) if integer else float(value)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]
