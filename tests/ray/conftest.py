"""Ray-tier fixtures: a small corpus prepared once per session, and tiny training configs that use it."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from raylm.config import resolve
from tests.conftest import TINY_CONFIG

# Small enough to train in seconds, big enough that every rank of a (2, 2, 2) layout has real work.
SMALL_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=64",
               "data.vocab_size=512", "data.seq_len=32", "parallel.micro_batch=2", "train.global_batch=8",
               "train.max_steps=4", "train.eval_every=0", "train.eval_batches=1", "train.report_every=2",
               "schedule.lr.warmup_steps=1", "parallel.zero_stage=0", "parallel.pp=1", "checkpoint.every_steps=0",
               "data.val_fraction=0.1"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few real standard-library modules copied into a folder: real text, stable across runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "dataclasses.py", "functools.py", "json/decoder.py", "json/encoder.py",
                 "pathlib.py", "string.py", "textwrap.py", "typing.py", "heapq.py", "bisect.py", "random.py"):
        source = stdlib / name
        if source.exists():
            (folder / name.replace("/", "_")).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def prepared(ray_cluster, small_corpus, tmp_path_factory) -> Path:
    """The small corpus tokenized into shards once per session; returns data.out_dir."""
    from raylm.config.loader import read_yaml
    from raylm.data.prepare import prepare

    out_dir = tmp_path_factory.mktemp("data")
    prepare(resolve(read_yaml(TINY_CONFIG), SMALL_MODEL + [f"data.paths=['{small_corpus}']",
                                                            f"data.out_dir={out_dir}"]))
    return out_dir


@pytest.fixture
def small_config(prepared, tmp_path, small_corpus):
    """Build a validated small config for this test's own run folder: small_config(name, *overrides)."""
    from raylm.config.loader import read_yaml

    def build(name: str, *overrides: str):
        return resolve(read_yaml(TINY_CONFIG), SMALL_MODEL + [
            f"data.paths=['{small_corpus}']", f"data.out_dir={prepared}", f"run.dir={tmp_path / 'runs'}",
            f"run.name={name}", *overrides])

    return build
