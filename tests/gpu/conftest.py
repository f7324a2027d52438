"""GPU-tier fixtures: a small slice of the default corpus."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_corpus_dir() -> Path:
    """The standard library's json package: real text, a few hundred KB, on every machine."""
    return Path(sysconfig.get_paths()["stdlib"]) / "json"
