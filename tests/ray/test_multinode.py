"""Multi-node Ray on one machine: pipeline stages on two nodes match one node bit for bit, TP groups stay on a
node, and a run that loses a whole node finishes by itself with the losses of an uninterrupted run.

Why a separate process for the cluster and for each multi-node run: this pytest process is already connected to
the session's local Ray (tests/conftest.py), `ray.init` holds one cluster per process, and
`Cluster.shutdown` resets the process's internal KV client, which would break the session Ray for the tests
after this file. So tests/ray/multinode_cluster.py hosts the cluster (head + node_a + node_b) in its own process
for the module, and each multi-node run is `raylm train` in a subprocess with RAY_ADDRESS set, the way users run
it. References run in this process on the session's single-node Ray. Every run pins one torch thread per
worker: raylm sizes threads by the workers sharing a node (docs/ray-facts.md 1), so one worker per node would
otherwise run two threads where the one-node reference runs one, and the comparison is about placement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylm.train.driver import train
from raylm.train.metrics import read_metrics
from raylm.train.placement import read_placement
from tests.conftest import REPO_ROOT, TINY_CONFIG
from tests.ray.conftest import SMALL_MODEL

CLUSTER_SCRIPT = Path(__file__).with_name("multinode_cluster.py")
ONE_WORKER_PER_NODE = ("parallel.cpus_per_worker=2",)  # a worker takes a whole 2-CPU node, so stages spread
THREADS = ("train.torch_threads=1",)
RUN_TIMEOUT_S = 240


class ClusterHost:
    """The cluster process: its address and {name: node_id}; remove() and add() nodes while runs go on."""

    def __init__(self, names: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(CLUSTER_SCRIPT), *names], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO_ROOT)
        self.address, self.nodes = None, {}
        self._read()

    def _read(self) -> None:
        line = self.proc.stdout.readline()
        assert line, f"the cluster process exited with {self.proc.poll()}"
        state = json.loads(line)
        self.address, self.nodes = state["address"], state["nodes"]

    def command(self, verb: str, name: str) -> None:
        self.proc.stdin.write(f"{verb} {name}\n")
        self.proc.stdin.flush()
        self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository importable and Ray Train polling often (both inherited by
    the raylets and the workers they start)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    env["RAY_AUTH_MODE"] = "token"  # as on real clusters (README.md); the session Ray made ~/.ray/auth_token
    return {**env, **extra}


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    host = ClusterHost(["node_a", "node_b"])
    yield host
    host.close()


def overrides(prepared, small_corpus, run_dir: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL_MODEL, f"data.paths=['{small_corpus}']", f"data.out_dir={prepared}", f"run.dir={run_dir}",
            f"run.name={name}", *THREADS, *extra]


def start_run(cluster: ClusterHost, args: list[str], console: Path) -> subprocess.Popen:
    """`raylm train` against the multi-node cluster, as a user would start it; its console goes to a file (a pipe
    nobody reads while the test waits would fill and stall the driver)."""
    code = "import sys; from raylm.cli import main; sys.exit(main(sys.argv[1:]))"
    with console.open("w") as out:
        return subprocess.Popen([sys.executable, "-c", code, "train", str(TINY_CONFIG), *args], cwd=REPO_ROOT,
                                env=_env(RAY_ADDRESS=cluster.address), stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, console: Path) -> None:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, console.read_text()[-3000:]


def losses(run: Path) -> list[tuple[float, str]]:
    """Each step's (loss, samples_sha), each step logged once and in order."""
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(len(rows)))
    return [(r["loss"], r["samples_sha"]) for r in rows]


def reference(small_config, name: str, *extra: str) -> list[tuple[float, str]]:
    """The same run on the session's one-node Ray."""
    cfg = small_config(name, *THREADS, *extra)
    train(cfg)
    return losses(Path(cfg.run.dir) / cfg.run.name)


def nodes_by_stage(run: Path) -> dict[int, set[str]]:
    stages: dict[int, set[str]] = {}
    for entry in read_placement(run):
        stages.setdefault(entry["pp_stage"], set()).add(entry["node_id"])
    return stages


def test_pipeline_stages_on_two_nodes_match_one_node(cluster, ray_cluster, prepared, small_corpus, small_config,
                                                     tmp_path):
    console = tmp_path / "spread.log"
    finish(start_run(cluster, overrides(prepared, small_corpus, tmp_path, "spread", "parallel.pp=2",
                                        *ONE_WORKER_PER_NODE), console), console)
    stages = nodes_by_stage(tmp_path / "spread")
    assert stages[0] != stages[1] and stages[0] | stages[1] == set(cluster.nodes.values())
    expected = reference(small_config, "one-node", "parallel.pp=2")
    got = losses(tmp_path / "spread")
    assert len(got) == 4 and got == expected  # bitwise: fp32, the same samples in the same order


def test_tensor_parallel_groups_stay_on_one_node(cluster, prepared, small_corpus, tmp_path):
    console = tmp_path / "tp.log"
    finish(start_run(cluster, overrides(prepared, small_corpus, tmp_path, "tp", "parallel.pp=2", "parallel.tp=2",
                                        "train.max_steps=2"), console), console)
    placement = read_placement(tmp_path / "tp")
    assert len(placement) == 4
    tp_groups: dict[tuple[int, int], set[str]] = {}
    for entry in placement:
        tp_groups.setdefault((entry["pp_stage"], entry["dp_rank"]), set()).add(entry["node_id"])
    assert all(len(nodes) == 1 for nodes in tp_groups.values()), placement  # TP all-reduces never cross nodes
    assert tp_groups[(0, 0)] != tp_groups[(1, 0)], placement  # 2 CPUs per node: one stage per node


def test_losing_a_node_recovers_by_itself_bit_identical(cluster, prepared, small_corpus, small_config, tmp_path):
    steps = ("train.max_steps=12", "checkpoint.every_steps=2", "checkpoint.keep=2", "parallel.pp=2")
    run, console = tmp_path / "lost", tmp_path / "lost.log"
    proc = start_run(cluster, overrides(prepared, small_corpus, tmp_path, "lost", *steps, *ONE_WORKER_PER_NODE,
                                        "fault.max_failures=2"), console)
    try:
        rows_at_loss = wait_for_checkpoint(run, proc)
        lost = cluster.nodes["node_b"]
        assert lost in {e["node_id"] for e in read_placement(run)}, "node_b hosts a worker"
        cluster.command("remove", "node_b")  # SIGKILL of every process of the node, raylet included
        cluster.command("add", "node_c")
    finally:
        finish(proc, console)
    assert rows_at_loss < 12, "the node was lost mid-run"
    assert lost not in {e["node_id"] for e in read_placement(run)}  # the restarted group runs on node_c
    assert [r["resumed_from"] for r in read_metrics(run) if "resumed_from" in r]
    assert losses(run) == reference(small_config, "lost-ref", *steps)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout_s: float = 180) -> int:
    """Block until the run has committed its first checkpoint; return how many steps it has logged."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        checkpoints = run / "checkpoints"
        if checkpoints.exists() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            return len((run / "metrics.jsonl").read_text().splitlines())
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint committed (exit code {proc.poll()})")
