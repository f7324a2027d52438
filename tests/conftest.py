"""Shared fixtures: tier markers by folder, a local Ray started once per session, tiny configs, tmp run dirs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "jobs" / "configs" / "tiny.yaml"
RAY_NUM_CPUS = 4  # fixed, so tests behave the same on any machine; workers take fractional CPUs


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier (unit, distributed, ray, gpu) from its folder; skip gpu without CUDA."""
    import torch

    has_cuda = torch.cuda.is_available()
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "distributed", "ray", "gpu"):
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "gpu" and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray (token authentication on by default, dashboard on 127.0.0.1 for Ray Train's placement-group
    cleaner) shared by every ray-tier test."""
    import ray

    from raylm.train.ray_cluster import job_env_vars

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not ray.is_initialized():  # the job environment raylm's connect_ray gives its jobs, and a faster poll
        env_vars = {**job_env_vars(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": env_vars})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_tree():
    """The tiny run config as a raw mapping (apply overrides with raylm.config.resolve)."""
    from raylm.config.loader import read_yaml

    return read_yaml(TINY_CONFIG)


@pytest.fixture
def run_dir(tmp_path):
    """A fresh folder for run.dir."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def warnings_seen(caplog):
    """Warnings of the raylm logger (which may not propagate once setup_logging ran)."""
    from raylm.log import get_logger

    logger = get_logger()
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger=logger.name)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)
