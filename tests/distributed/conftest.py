"""Distributed-tier fixtures: the session's uninterrupted reference runs, in plain processes (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import DP2, PP2, train_many, world_of  # noqa: E402

from tests.conftest import ReferenceRuns, small_configs  # noqa: E402


@pytest.fixture(scope="session")
def plain_references(prepared, small_corpus, tmp_path_factory) -> ReferenceRuns:
    """Reference runs shared by every module of the tier; the two-rank ones train in one process group."""

    def train_batch(cfgs):
        errors = train_many(cfgs, world_of(cfgs[0]))
        assert errors == [None] * len(cfgs), errors

    build = small_configs(prepared, small_corpus, tmp_path_factory.mktemp("references"))
    return ReferenceRuns(build, train_batch, together=[[PP2, DP2]])
