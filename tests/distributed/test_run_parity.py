"""Whole training runs without Ray (raylm's Trainer on gloo ranks in plain processes, dist_runs.py): each layout
trains like one worker, the batch ramp works with pp, evaluation does not move the training stream, and
train.profile_steps writes every rank's trace and top operators (without changing a loss).

The runs of one world size train in one process group, once per module, as test_parity.py batches layouts.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import train_many, world_of  # noqa: E402

from raylm.train.metrics import read_metrics  # noqa: E402
from tests.conftest import small_configs  # noqa: E402

pytestmark = pytest.mark.runs
PARITY_RTOL = 1e-5
RUNS_DIR: dict[str, Path] = {}  # the module's run.dir, once its runs trained
LAYOUTS = {
    "pp2": ("parallel.pp=2",),
    "tp2": ("parallel.tp=2",),
    "dp2": ("parallel.dp=2",),
    "cp2": (
        "parallel.cp=2",
    ),  # Ulysses: both ranks read the replica's windows, each trains half the positions
}
RAMP = (
    "schedule.batch.start=4",
    "schedule.batch.increment=4",
    "schedule.batch.ramp_tokens=256",
    "train.max_steps=5",
)
RUNS = {
    "ref": (),
    "ramp-ref": RAMP,
    **{f"layout-{name}": layout for name, layout in LAYOUTS.items()},
    "ramp-pp2": ("parallel.pp=2", *RAMP),
    "with-eval": ("train.eval_every=1", "parallel.pp=2", "train.profile_steps=[1, 2]"),
}


@pytest.fixture(scope="module")
def runs(prepared, small_corpus, tmp_path_factory) -> dict[str, list[dict]]:
    """Every run's metrics rows by name; the one-worker runs in one group, the two-worker runs in another."""
    build = small_configs(
        prepared, small_corpus, RUNS_DIR.setdefault("dir", tmp_path_factory.mktemp("run-parity"))
    )
    cfgs = {name: build(name, *overrides) for name, overrides in RUNS.items()}
    for world in sorted({world_of(cfg) for cfg in cfgs.values()}):
        batch = [cfg for cfg in cfgs.values() if world_of(cfg) == world]
        assert train_many(batch, world) == [None] * len(batch)
    rows = {name: read_metrics(Path(cfg.run.dir) / cfg.run.name) for name, cfg in cfgs.items()}
    for name, cfg in cfgs.items():
        assert [r["step"] for r in rows[name]] == list(range(cfg.train.max_steps)), name
    return rows


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_worker(runs, layout):
    expected, got = runs["ref"], runs[f"layout-{layout}"]
    assert losses(got) == pytest.approx(losses(expected), rel=PARITY_RTOL)
    assert got[-1]["loss"] < got[0]["loss"]
    shas = [r["samples_sha"] for r in expected]
    assert [r["samples_sha"] for r in got] == shas  # the same samples in the same steps, exactly
    assert len(set(shas)) == len(expected)


def test_batch_ramp_with_pipeline_matches_single_worker(runs, small_config):
    rows = runs["ramp-pp2"]
    assert [r["batch_size"] for r in rows] == [4, 4, 8, 8, 8]
    assert rows[-1]["tokens"] == (4 + 4 + 8 + 8 + 8) * small_config("unused").data.seq_len
    assert rows[-1]["samples"] == 32
    assert losses(rows) == pytest.approx(losses(runs["ramp-ref"]), rel=PARITY_RTOL)


def test_evaluation_does_not_move_the_training_stream(runs):
    rows = runs["with-eval"]
    assert all("val_loss" in r and r["val_ppl"] > 1 for r in rows)
    assert all(0 < r["pipe_wait_frac"] < 1 for r in rows)  # stage 0 waits on stage 1 every step
    assert losses(rows) == pytest.approx(losses(runs["ref"]), rel=PARITY_RTOL)


def test_profile_steps_write_every_ranks_trace_and_top_operators(runs):
    folder = RUNS_DIR["dir"] / "with-eval" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank-00000.json.gz",
        "rank-00000.top.txt",
        "rank-00001.json.gz",
        "rank-00001.top.txt",
    ]
    for rank in (0, 1):
        with gzip.open(folder / f"rank-{rank:05d}.json.gz", "rt") as trace:
            events = json.load(trace)["traceEvents"]
        names = {e.get("name") for e in events}
        assert {"raylm step 1", "raylm step 2"} <= names and "raylm step 3" not in names
        assert any(name.startswith("aten::") for name in names if name)
        assert any(e.get("name") == "[memory]" for e in events)  # the profiler's memory events
        top = (folder / f"rank-{rank:05d}.top.txt").read_text()
        assert "Self CPU" in top and "aten::" in top
