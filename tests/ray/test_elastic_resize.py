"""Elastic data parallelism on a multi-node Ray: a run with `parallel.dp: [1, 2]` shrinks to dp=1 when a node goes,
grows back to dp=2 when one joins, and trains on the samples of an uninterrupted dp=2 run, step for step.

The cluster (a head without CPUs and two 2-CPU nodes, each worker taking 1 CPU) runs in its own process, and the
elastic run is `raylm train` in a subprocess, as in tests/ray/test_multinode.py (which says why). The reference
dp=2 run trains in this process on the session's one-node Ray.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from raylm.train.metrics import read_metrics
from tests.ray.test_multinode import THREADS, ClusterHost, finish, overrides, start_run

# Reduction order differs between dp=1 and dp=2, and AdamW amplifies those last-bit differences step by step: a
# moderate lr and 36 steps keep the losses within the 1e-5 the comparison allows.
LAYOUT = (
    "parallel.pp=2",
    "parallel.zero_stage=1",
    "train.global_batch=8",
    "parallel.micro_batch=2",
    "optim.lr=1e-3",
)
STEPS = ("train.max_steps=36", "checkpoint.every_steps=3", "checkpoint.keep=2")
# report_every=1: each step waits for a controller poll (docs/ray-facts.md 2), which paces the run so that it is
# still training when the node comes back
ELASTIC = (
    "parallel.dp=[1, 2]",
    "parallel.cpus_per_worker=1",
    "fault.max_failures=2",
    "fault.resize_check_s=1",
    "train.report_every=1",
)


@pytest.fixture(scope="module")
def elastic_cluster(ray_cluster):
    host = ClusterHost(["node_a", "node_b"])
    yield host
    host.close()


class MetricsWatcher:
    """Polls metrics.jsonl while the run goes on and remembers every (step, dp) row it ever saw, including rows a
    restarted group later drops and writes again."""

    def __init__(self, run: Path):
        self.run, self.seen, self.stop = run, set(), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            # a row half written, or the file being replaced: look again
            with contextlib.suppress(ValueError, KeyError, OSError):
                self.seen |= {(r["step"], r["dp"]) for r in read_metrics(self.run)}
            time.sleep(0.05)

    def wait_for(self, predicate, what: str, proc, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None:
            if predicate(self.seen):
                return
            time.sleep(0.05)
        raise AssertionError(f"{what} never happened (exit code {proc.poll()}); seen {sorted(self.seen)}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.slow  # four worker-group starts, a node's death and a node's start: ~4-5 minutes on 2 shared cores
def test_elastic_run_shrinks_on_a_lost_node_and_grows_back_with_the_same_samples(
    elastic_cluster, prepared, small_corpus, references, tmp_path
):
    run, console = tmp_path / "elastic", tmp_path / "elastic.log"
    proc = start_run(
        elastic_cluster,
        overrides(prepared, small_corpus, tmp_path, "elastic", *LAYOUT, *STEPS, *ELASTIC),
        console,
    )
    watcher = MetricsWatcher(run)
    try:
        watcher.wait_for(
            lambda seen: any(step >= 3 and dp == 2 for step, dp in seen), "training at dp=2", proc
        )
        elastic_cluster.command("remove", "node_b")  # every process of the node SIGKILLed
        watcher.wait_for(lambda seen: any(dp == 1 for _, dp in seen), "training at dp=1", proc)
        shrunk_at = max(step for step, dp in watcher.seen if dp == 1)
        elastic_cluster.command("add", "node_c")
        watcher.wait_for(
            lambda seen: any(dp == 2 and step > shrunk_at for step, dp in seen), "growing to dp=2", proc
        )
    finally:
        finish(proc, console)
        watcher.close()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(36))  # every step logged once, in order, and the run ended
    dps = [r["dp"] for r in rows]
    first_small, last_small = dps.index(1), len(dps) - 1 - dps[::-1].index(1)
    assert dps == [2] * first_small + [1] * (last_small - first_small + 1) + [2] * (len(dps) - last_small - 1)
    grown_from = rows[last_small + 1]
    assert grown_from["resumed_from"] == last_small + 1  # grew from a checkpoint of the last dp=1 step
    assert not [(step, dp) for step, dp in watcher.seen if step > last_small and dp == 1], (
        "a step trained at dp=1 after the resize checkpoint: growing lost or repeated a step"
    )

    # the same run at a fixed dp=2, uninterrupted, on the session's one-node Ray
    expected = references.rows(*THREADS, *LAYOUT, *STEPS, "parallel.dp=2")
    assert [r["samples_sha"] for r in rows] == [r["samples_sha"] for r in expected]
    assert rows[-1]["tokens"] == expected[-1]["tokens"]
    for got, want in zip(rows, expected, strict=False):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got["step"], got["dp"])
