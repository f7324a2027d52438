"""Ray-tier fixtures: the session's uninterrupted reference runs on the session's local Ray."""

from __future__ import annotations

import pytest

from tests.conftest import ReferenceRuns, small_configs


@pytest.fixture(scope="session")
def ray_references(ray_cluster, prepared, small_corpus, tmp_path_factory) -> ReferenceRuns:
    """Reference runs (a real TorchTrainer each) shared by every module of the tier: each trains once."""
    from raylm.train.driver import train

    def train_each(cfgs):
        for cfg in cfgs:
            train(cfg)

    return ReferenceRuns(
        small_configs(prepared, small_corpus, tmp_path_factory.mktemp("ray-references")), train_each
    )
