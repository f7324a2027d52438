"""Config entry points: load a YAML run config with dotted overrides into a validated, typed tree."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from raylm.config.loader import apply_overrides, build_config, parse_override, read_yaml, to_dict
from raylm.config.schema import Config
from raylm.config.validate import validate


def resolve(tree: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Raw mapping + overrides -> validated Config. The CLI and Tune trials both come through here."""
    return validate(build_config(apply_overrides(dict(tree), overrides)))


def load_config(path: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Read a run config file, apply `section.key=value` overrides and validate."""
    return resolve(read_yaml(path), overrides)


def with_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """A new validated Config: `cfg` with dotted overrides applied (a Tune trial's config)."""
    return resolve(to_dict(cfg), overrides)


__all__ = ["Config", "load_config", "resolve", "with_overrides", "to_dict", "parse_override"]
