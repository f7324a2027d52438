"""Shared fixtures: tier markers by folder, a local Ray started once per session, tiny configs, tmp run dirs,
a small corpus prepared once per session (without Ray), small training configs, and the session's one cache of
uninterrupted reference runs."""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "jobs" / "configs" / "tiny.yaml"
RAY_NUM_CPUS = 4  # fixed, so tests behave the same on any machine; workers take fractional CPUs
# Small enough to train in seconds, big enough that every rank of a (2, 2, 2) layout has real work.
SMALL_MODEL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.max_seq_len=64",
    "data.vocab_size=512",
    "data.seq_len=32",
    "parallel.micro_batch=2",
    "train.global_batch=8",
    "train.max_steps=4",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.report_every=2",
    "schedule.lr.warmup_steps=1",
    "parallel.zero_stage=0",
    "parallel.pp=1",
    "checkpoint.every_steps=0",
    "data.val_fraction=0.1",
]


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

    from raylm.ray_connect import job_env_vars

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not ray.is_initialized():  # the job environment raylm's connect_ray gives its jobs, and a faster poll
        env_vars = {**job_env_vars(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        ray.init(
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": env_vars},
        )
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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few real standard-library modules copied into a folder: real text, stable across runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in (
        "argparse.py",
        "dataclasses.py",
        "functools.py",
        "json/decoder.py",
        "json/encoder.py",
        "pathlib.py",
        "string.py",
        "textwrap.py",
        "typing.py",
        "heapq.py",
        "bisect.py",
        "random.py",
    ):
        source = stdlib / name
        if source.exists():
            (folder / name.replace("/", "_")).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def prepared(small_corpus, tmp_path_factory) -> Path:
    """The small corpus tokenized into shards once per session, in this process (the shards `raylm prepare`
    writes on Ray are the same bytes: tests/ray/test_prepare.py); returns data.out_dir."""
    from raylm.config import resolve
    from raylm.config.loader import read_yaml
    from raylm.data.prepare import prepare

    out_dir = tmp_path_factory.mktemp("data")
    prepare(
        resolve(
            read_yaml(TINY_CONFIG),
            SMALL_MODEL + [f"data.paths=['{small_corpus}']", f"data.out_dir={out_dir}"],
        ),
        use_ray=False,
    )
    return out_dir


def small_configs(prepared: Path, small_corpus: Path, runs: Path):
    """small_config(name, *overrides): a validated small config whose run folder is runs/<name>."""
    from raylm.config import resolve
    from raylm.config.loader import read_yaml

    def build(name: str, *overrides: str):
        return resolve(
            read_yaml(TINY_CONFIG),
            SMALL_MODEL
            + [
                f"data.paths=['{small_corpus}']",
                f"data.out_dir={prepared}",
                f"run.dir={runs}",
                f"run.name={name}",
                *overrides,
            ],
        )

    return build


@pytest.fixture
def small_config(prepared, tmp_path, small_corpus):
    """Build a validated small config for this test's own run folder: small_config(name, *overrides)."""
    return small_configs(prepared, small_corpus, tmp_path / "runs")


class ReferenceRuns:
    """Uninterrupted reference runs, each trained once per session however many modules compare against it:
    rows(*overrides) is its metrics.jsonl. `train_batch(cfgs)` trains a list of runs; keys listed together in
    `together` train in one call when the first of them is asked for (one process group per world size)."""

    def __init__(self, build, train_batch, together: list[list[tuple[str, ...]]] = ()):
        self.build, self.train_batch = build, train_batch
        self.together = [list(keys) for keys in together]
        self._rows: dict[tuple[str, ...], list[dict]] = {}

    def rows(self, *overrides: str) -> list[dict]:
        from raylm.train.metrics import read_metrics

        if overrides not in self._rows:
            keys = next((keys for keys in self.together if overrides in keys), [overrides])
            keys = [key for key in keys if key not in self._rows]
            cfgs = [self.build(f"ref-{len(self._rows) + i}", *key) for i, key in enumerate(keys)]
            self.train_batch(cfgs)
            for key, cfg in zip(keys, cfgs, strict=False):
                rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
                assert [r["step"] for r in rows] == list(range(cfg.train.max_steps)), "each step logged once"
                self._rows[key] = rows
        return self._rows[overrides]

    def losses(self, *overrides: str) -> list[tuple[float, str]]:
        """Each step's (loss, samples_sha)."""
        return [(r["loss"], r["samples_sha"]) for r in self.rows(*overrides)]


@pytest.fixture(scope="session")
def references(prepared, small_corpus, tmp_path_factory) -> ReferenceRuns:
    """The session's uninterrupted reference runs, shared by every tier: each trains once, in plain processes
    (raylm's Trainer on gloo ranks, tests/distributed/dist_runs.py), however many tests compare against it. A
    run on Ray Train matches its plain twin bit for bit (the same loop, samples and thread count), so Ray-tier
    tests compare against these too; the two-rank fault and resume references train in one process group."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))  # spawned ranks import it by module name
    from dist_runs import DP2, PP2, train_many, world_of

    def train_batch(cfgs):
        errors = train_many(cfgs, world_of(cfgs[0]))
        assert errors == [None] * len(cfgs), errors

    build = small_configs(prepared, small_corpus, tmp_path_factory.mktemp("references"))
    return ReferenceRuns(build, train_batch, together=[[PP2, DP2]])
