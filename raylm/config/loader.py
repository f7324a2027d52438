"""YAML loading (yaml.safe_load), dotted overrides shared by the CLI and Tune, and typed conversion."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import yaml

from raylm.config.schema import Config, key_of
from raylm.errors import ConfigError

MAX_DEPTH = 32  # a run config is sections of keys with at most lists of mappings below: 4 levels in practice


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}; pass an existing YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            f"save it as UTF-8"
        ) from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}; fix the syntax there") from None
    except RecursionError:
        raise ConfigError(
            f"{path}: YAML nested too deeply for a run config; a config is sections of keys"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is parsed as YAML (`parallel.pp=2`, `data.paths='["a"]'`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value, e.g. parallel.pp=2")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(
            f"override {key.strip()}: value nested too deeply; pass a plain value or a flat list"
        ) from None
    return key.strip(), value


def _safe_load(text: str) -> Any:
    """yaml.safe_load, and nothing nested deeper than MAX_DEPTH (deeper YAML would exhaust Python's stack
    somewhere later: in copying, validating or printing the config)."""
    data = yaml.safe_load(text)
    if _depth(data) > MAX_DEPTH:
        raise RecursionError
    return data


def _depth(node: Any, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of lists and mappings, counted only up to `limit` (so the count itself cannot overflow)."""
    if limit <= 0 or not isinstance(node, (dict, list)):
        return 0
    children = node.values() if isinstance(node, dict) else node
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def apply_overrides(tree: dict, overrides: Mapping[str, Any] | Iterable[str]) -> dict:
    """Return a copy of the raw tree with dotted overrides set; strings `k=v` or a mapping {dotted: value}."""
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(item) for item in overrides)
    tree = _deep_copy(tree)
    for dotted, value in overrides.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


MOVED_KEYS = {"tune.eval_samples": "train.eval_samples"}  # old key -> the key that replaced it


def build_config(tree: Mapping[str, Any]) -> Config:
    """Convert a raw mapping into the typed tree, naming unknown keys (with the closest match) and bad types."""
    return _build(Config, _expand_every_steps(_expand_dp_range(tree)), prefix="")


def _expand_every_steps(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """`checkpoint.every_steps: auto` is shorthand for checkpoint.interval=auto (and every_steps 0)."""
    section = tree.get("checkpoint") if isinstance(tree, Mapping) else None
    if not isinstance(section, Mapping) or section.get("every_steps") != "auto":
        return tree
    if section.get("interval", "auto") != "auto":
        raise ConfigError(
            f"checkpoint.every_steps=auto and checkpoint.interval={section['interval']!r} disagree; keep one"
        )
    return {**tree, "checkpoint": {**section, "every_steps": 0, "interval": "auto"}}


def _expand_dp_range(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """`parallel.dp: [min, max]` is shorthand for parallel.dp_min and dp_max; with a range and no dp of its own, dp
    starts at max (the size the run aims for; each worker group sets its own)."""
    parallel = tree.get("parallel") if isinstance(tree, Mapping) else None
    if not isinstance(parallel, Mapping):
        return tree
    parallel = dict(parallel)
    dp = parallel.get("dp")
    if isinstance(dp, list):
        if len(dp) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in dp):
            raise ConfigError(
                f"parallel.dp={short_repr(dp)} must be an integer or a range [min, max] of two "
                f"integers; e.g. parallel.dp=[2, 8]"
            )
        if "dp_min" in parallel or "dp_max" in parallel:
            raise ConfigError(
                "parallel.dp=[min, max] and parallel.dp_min/dp_max both give a DP range; keep one"
            )
        parallel["dp_min"], parallel["dp_max"] = parallel.pop("dp")
    if "dp" not in parallel and isinstance(parallel.get("dp_max"), int) and parallel["dp_max"] > 0:
        parallel["dp"] = parallel["dp_max"]
    return {**tree, "parallel": parallel}


def to_dict(cfg: Any) -> dict:
    """The config as plain Python data keyed as in YAML, ready for yaml.safe_dump or JSON."""
    return {
        key_of(f): to_dict(value) if dataclasses.is_dataclass(value) else _deep_copy(value)
        for f in dataclasses.fields(cfg)
        for value in [getattr(cfg, f.name)]
    }


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf key as (dotted name, doc, default): the text behind `raylm config --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{key_of(f)}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_fields(hints[f.name], prefix=f"{name}."))
        else:
            # typeshed keeps default_factory's MISSING in the union: `is not MISSING` does not narrow it.
            factory = cast(Callable[[], Any], f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            rows.append((name, f.metadata.get("doc", ""), default))
    return rows


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {key_of(f) for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in MOVED_KEYS:
            raise ConfigError(f"{prefix}{key} is now {MOVED_KEYS[prefix + key]}; rename the key")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = (
                f"; did you mean {prefix}{close[0]}?"
                if close
                else f"; known keys: {', '.join(sorted(known))}"
            )
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        key = key_of(f)
        if key not in raw:
            continue
        kind = hints[f.name]
        dotted = f"{prefix}{key}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[f.name] = _build(kind, raw[key], prefix=f"{dotted}.")
        else:
            values[f.name] = _coerce(dotted, raw[key], kind)
    return cls(**values)


def _coerce(dotted: str, value: Any, kind: type) -> Any:
    """Check one leaf against its declared type; ints are accepted for floats and numeric strings like 3e-4."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(
                f"{dotted}={short_repr(value)} is not a finite number; set a real value, e.g. "
                f"{dotted}={_example(kind)}"
            )
    elif kind is str:
        if isinstance(value, (str, bool)) and not (isinstance(value, bool) and dotted != "parallel.use_gpu"):
            return str(value).lower() if isinstance(value, bool) else value
    elif kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return value
    else:  # pragma: no cover - the schema only uses the kinds above
        raise AssertionError(f"unsupported field type {kind} for {dotted}")
    raise ConfigError(
        f"{dotted} must be {_kind_name(kind)}, got {short_repr(value)} ({type(value).__name__}); "
        f"set e.g. {dotted}={_example(kind)}"
    )


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters, so an absurd value still gives a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _as_float(value: Any) -> float | None:
    """A number as float (inf when beyond float's range), a numeric string like '3e-4' too; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf
    except ValueError:
        return None


def _kind_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}[
        kind
    ]


def _example(kind: type) -> str:
    return {bool: "true", int: "2", float: "3e-4", str: "name", list: '\'["a", "b"]\''}[kind]


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree
