"""cluster/kuberay-rayjob.yaml rehearsed on this machine: its pods and its submitter as KubeRay builds them.

The head and the two worker "pods" run the `ray start` command and environment BuildPod derives from the
RayJob's rayClusterSpec (tests/ray/kuberay_rehearsal.py); token authentication is on as authOptions makes it.
A moto S3 server on 127.0.0.1 holds the corpus, the prepared data and the run under the manifest's own bucket
name (`your-bucket`), so the entrypoint's URIs run unchanged. The storage credentials reach the Ray processes
only through the manifest's envFrom (the Secret `raylm-storage`, rendered the way cluster/README.md creates
it): when the manifest stops wiring them, the job fails. The submitter runs BuildJobSubmitCommand's command
line under `/bin/bash -ce` with only the environment KubeRay gives it.

What differs from Kubernetes, and why (each forced by one machine; `RehearsalCluster.localize`,
`local_entrypoint`, `image_env`):
- ports: free ports for every pod instead of 6379/8265/8080/52365; the dashboard binds 127.0.0.1, not 0.0.0.0;
- addresses: the head Service's FQDN is 127.0.0.1 (every pod is this host);
- resources: the worker pods' 96 CPUs / 8 GPUs / 1000Gi become 2 CPUs, no GPU, Ray's default memory; a small
  object store each, as three pods share /dev/shm;
- each pod has its own HOME, TMPDIR and Ray temp dir; pods share DeepSpeed's built op;
- the image: the code is this checkout (/home/ray/raylm -> the repository root), and the run config is
  tiny.yaml with a model small enough for 2 cores instead of gpt2-small.yaml;
- a worker pod whose `ray start` gives up on a slow raylet is restarted, as the kubelet would.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, SMALL_MODEL
from tests.ray.kuberay_rehearsal import (
    Pod,
    RehearsalCluster,
    container_env,
    image_env,
    job_submit_command,
    kill_pod_tree,
    new_root,
    new_token,
    ray_container,
    stop_pods,
    submitter_env,
)
from tests.s3_server import DUMMY_KEYS, client, keys, s3_server

RAYJOB = REPO_ROOT / "cluster" / "kuberay-rayjob.yaml"
BUCKET = "your-bucket"  # the manifest's placeholder bucket, created on the local server
STORAGE_SECRET = "raylm-storage"  # `kubectl create secret generic raylm-storage ...` in cluster/README.md
STEPS, CHECKPOINT_EVERY = 12, 4
RUN_OVERRIDES = [
    *SMALL_MODEL,
    "parallel.pp=2",
    f"train.max_steps={STEPS}",
    f"checkpoint.every_steps={CHECKPOINT_EVERY}",
    "train.report_every=4",
    "checkpoint.keep=3",
]
EXPORT_URI = f"s3://{BUCKET}/raylm/exports/gpt2-small"
CORPUS_FILES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "typing.py", "random.py")


def local_entrypoint(entrypoint: str) -> str:
    """The manifest's entrypoint with the image's code path made this checkout's, and the tiny run config."""
    words = entrypoint.replace("/home/ray/raylm", str(REPO_ROOT)).split()
    words = [
        str(REPO_ROOT / "jobs/configs/tiny.yaml") if w.endswith("jobs/configs/gpt2-small.yaml") else w
        for w in words
    ]
    return " ".join([*words, *RUN_OVERRIDES])


def upload_corpus(endpoint: str, prefix: str) -> None:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    s3 = client(endpoint)
    for name in CORPUS_FILES:
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}{name}", Body=(stdlib / name).read_bytes())


def s3_prefix(uri: str) -> str:
    assert uri.startswith(f"s3://{BUCKET}/"), uri
    return uri.removeprefix(f"s3://{BUCKET}/")


class Stage:
    """One rehearsal: the S3 server, the rendered Secrets, the RayJob (entrypoint localized), its clusters."""

    def __init__(self, endpoint: str, root: Path):
        self.endpoint, self.root = endpoint, root
        self.rayjob = yaml.safe_load(RAYJOB.read_text())
        self.rayjob["spec"]["entrypoint"] = local_entrypoint(self.rayjob["spec"]["entrypoint"])
        words = dict(w.split("=", 1) for w in self.rayjob["spec"]["entrypoint"].split() if "=" in w)
        self.run_prefix = f"{s3_prefix(words['run.dir'])}/{words['run.name']}/"
        self.corpus_prefix = s3_prefix(words["data.paths"])
        self.cluster_name = "raylm-gpt2-small-raycluster"  # utils.GenerateRayClusterName
        self.job_id = "raylm-gpt2-small-rehearsal"  # utils.GenerateRayJobId: name + a random suffix
        self.secret_data = {
            STORAGE_SECRET: {"AWS_ENDPOINT_URL": endpoint, **DUMMY_KEYS},
            self.cluster_name: {"auth_token": new_token()},  # the Secret authOptions makes KubeRay create
        }

    def cluster(self, name: str) -> RehearsalCluster:
        return RehearsalCluster(
            self.rayjob["spec"]["rayClusterSpec"], self.cluster_name, self.secret_data, self.root / name
        )

    def submitter(self, cluster: RehearsalCluster, name: str, run_name: str | None = None) -> Pod:
        """The submitter pod: BuildJobSubmitCommand under /bin/bash -ce, with KubeRay's submitter env only."""
        root = self.root / name
        root.mkdir(parents=True)
        rayjob = copy.deepcopy(self.rayjob)
        if run_name:
            rayjob["spec"]["entrypoint"] = re.sub(
                r"run\.name=\S+", f"run.name={run_name}", rayjob["spec"]["entrypoint"]
            )
        command = job_submit_command(rayjob, cluster.dashboard, self.job_id)
        env = submitter_env(
            cluster.dashboard, self.job_id, self.secret_data[self.cluster_name]["auth_token"], image_env(root)
        )
        return Pod(name, command, env, root, shell=("/bin/bash", "-ce", "--"))

    def submit(self, cluster: RehearsalCluster, name: str, timeout_s: float = 900) -> tuple[int, str]:
        """Run a submitter pod to its end: (exit status, console)."""
        pod = self.submitter(cluster, name)
        pod.start()
        try:
            return pod.process.wait(timeout=timeout_s), pod.output()
        finally:
            stop_pods([pod])

    def keys(self, prefix: str) -> dict[str, int]:
        return keys(self.endpoint, prefix, bucket=BUCKET)

    def read(self, key: str) -> bytes:
        return client(self.endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def run_prefix_of(self, run_name: str) -> str:
        return self.run_prefix.rstrip("/").rsplit("/", 1)[0] + f"/{run_name}/"

    def metrics(self, run_prefix: str | None = None) -> list[dict]:
        text = self.read((run_prefix or self.run_prefix) + "metrics.jsonl").decode()
        return [r for r in map(json.loads, text.splitlines()) if "loss" in r and "samples_sha" in r]


@pytest.fixture(scope="module")
def stage():
    root = new_root("rlk-")
    try:
        with s3_server() as endpoint:
            client(endpoint).create_bucket(Bucket=BUCKET)
            result = Stage(endpoint, root)
            upload_corpus(endpoint, result.corpus_prefix)
            yield result
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rehearsed(stage):
    """The RayJob run once on a rehearsal cluster, its submitter run twice; the cluster is removed afterwards
    (shutdownAfterJobFinishes) whatever happened."""
    cluster = stage.cluster("cluster-1")
    started = time.monotonic()
    try:
        cluster.start()
        nodes = cluster.nodes()
        first = stage.submit(cluster, "submitter-1")
        second = stage.submit(cluster, "submitter-2")  # a retried submitter pod (K8s Job backoffLimit)
        status = job_status(stage, cluster)
        # `kubectl exec` into the head pod: the export runs with that container's environment only
        run_uri = f"s3://{BUCKET}/{stage.run_prefix}".rstrip("/")
        export = subprocess.run(
            ["raylm", "export", run_uri, EXPORT_URI],
            env=cluster.pods[0].env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        yield {
            "nodes": nodes,
            "first": first,
            "second": second,
            "status": status,
            "export": export,
            "wall_s": time.monotonic() - started,
        }
    finally:
        cluster.stop()


def job_status(stage: Stage, cluster: RehearsalCluster) -> str:
    env = submitter_env(
        cluster.dashboard,
        stage.job_id,
        stage.secret_data[stage.cluster_name]["auth_token"],
        image_env(stage.root / "status"),
    )
    out = subprocess.run(
        ["ray", "job", "list", "--address", cluster.dashboard],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout + out.stderr


@pytest.mark.timeout(1800)  # its setup starts the cluster and runs the job: about 3-6 minutes on 2 cores
def test_rayjob_trains_on_the_worker_pods_with_the_manifests_credentials(stage, rehearsed):
    status, console = rehearsed["first"]
    assert status == 0, console[-6000:]
    assert "Job 'raylm-gpt2-small-rehearsal' succeeded" in console, console[-6000:]
    rows = stage.metrics()
    assert [r["step"] for r in rows] == list(range(STEPS))
    objects = stage.keys(stage.run_prefix)
    for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY):
        assert f"{stage.run_prefix}checkpoints/step-{step:08d}/manifest.json" in objects, sorted(objects)[:40]
    placement = [json.loads(stage.read(k)) for k in objects if "/placement/rank-" in k]
    assert len(placement) == 2, "pp=2: two ranks"
    workers = {n["node_id"] for n in rehearsed["nodes"] if not n["is_head_node"]}
    head = {n["node_id"] for n in rehearsed["nodes"] if n["is_head_node"]}
    assert len(workers) == 2 and len(head) == 1
    assert {p["node_id"] for p in placement} <= workers, "ranks on worker pods only, never the head"


@pytest.mark.timeout(1800)
def test_the_run_exports_from_object_storage_to_object_storage(stage, rehearsed):
    export = rehearsed["export"]
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    exported = stage.keys(s3_prefix(EXPORT_URI) + "/")
    assert any(k.endswith(".safetensors") for k in exported)
    assert any(k.endswith("config.json") for k in exported)
    print(f"rehearsal wall {rehearsed['wall_s']:.0f} s")


@pytest.mark.timeout(1800)
def test_a_retried_submitter_submits_nothing_twice(stage, rehearsed):
    status, console = rehearsed["second"]
    assert status == 0, console[-6000:]
    assert "submitted successfully" not in console and "succeeded" in console, console[-6000:]
    assert rehearsed["status"].count(stage.job_id) == 1, rehearsed["status"]
    assert len(stage.metrics()) == STEPS, "the second submitter pod trained nothing again"


def wait_for_object(stage: Stage, key: str, watched: list[Pod], timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if key in stage.keys(key):
            return
        for pod in watched:
            assert pod.process.poll() is None, f"{pod.name} exited before {key}: {pod.output()[-4000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{key} did not appear in {timeout_s} s")


def last_step_trained(root: Path) -> int:
    """The last step rank 0 wrote to its node-local metrics.jsonl (copied to the bucket only at reports)."""
    steps = []
    for path in root.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line).get("step", -1))
            except json.JSONDecodeError:  # a line cut by the kill
                continue
    return max(steps, default=-1)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the module's run (when first), two more cluster starts, a resumed run
def test_whole_cluster_loss_then_resubmission_resumes_bitwise(stage, rehearsed):
    """Every process of a rehearsal cluster (head, workers, submitter) SIGKILLed two steps after the first
    checkpoint is committed; a fresh cluster and the same RayJob again (KubeRay's backoffLimit retry, or a
    re-apply): the run resumes from that checkpoint on object storage, and every step's samples_sha and loss
    equal the uninterrupted run's bit for bit (that run: the module's RayJob, same config, other run name)."""
    reference = {r["step"]: r for r in stage.metrics()}
    run_name = "gpt2-small-preempted"
    prefix = stage.run_prefix_of(run_name)
    first_checkpoint = f"{prefix}checkpoints/step-{CHECKPOINT_EVERY:08d}/manifest.json"
    doomed = stage.cluster("cluster-lost")
    try:
        doomed.start()
        submitter = stage.submitter(doomed, "submitter-lost", run_name)
        submitter.start()
        wait_for_object(stage, first_checkpoint, [*doomed.pods, submitter])
        deadline = time.time() + 300  # mid-interval: steps after the checkpoint are lost and trained again
        while last_step_trained(doomed.root) < CHECKPOINT_EVERY + 1 and time.time() < deadline:
            time.sleep(0.2)
        kill_pod_tree([*doomed.pods, submitter])  # the whole cluster at once, head included
        lost_at = last_step_trained(doomed.root)
    finally:
        stop_pods([*doomed.pods])
    final = f"{prefix}checkpoints/step-{STEPS:08d}/manifest.json"
    assert final not in stage.keys(final), "the run finished before the kill: nothing was lost"
    fresh = stage.cluster("cluster-fresh")
    try:
        fresh.start()
        resubmitted = stage.submitter(fresh, "submitter-fresh", run_name)
        resubmitted.start()
        status = resubmitted.process.wait(timeout=900)
        console = resubmitted.output()
    finally:
        stop_pods([*fresh.pods])
    assert status == 0 and "succeeded" in console, console[-6000:]
    assert f"checkpoints/step-{CHECKPOINT_EVERY:08d} at step {CHECKPOINT_EVERY}" in console, console[-6000:]
    rows = stage.metrics(prefix)
    steps = [r["step"] for r in rows]
    sha_mismatches = sum(r["samples_sha"] != reference[r["step"]]["samples_sha"] for r in rows)
    loss_mismatches = sum(r["loss"] != reference[r["step"]]["loss"] for r in rows)
    print(
        f"whole-cluster loss: killed after step {lost_at} was logged, resumed at step {CHECKPOINT_EVERY}: "
        f"{lost_at + 1 - CHECKPOINT_EVERY} steps repeated; rows on S3 for steps {steps}; samples_sha "
        f"mismatches {sha_mismatches}, loss mismatches {loss_mismatches} (of {len(rows)} rows)"
    )
    resumed_steps = steps[-(STEPS - CHECKPOINT_EVERY) :]
    assert resumed_steps == list(range(CHECKPOINT_EVERY, STEPS)), "every step from the checkpoint on"
    assert len(set(steps)) == len(steps), "no step twice"
    assert sha_mismatches == 0 and loss_mismatches == 0
    assert steps == list(range(STEPS)), "the rows before the checkpoint are kept on object storage"


def test_pods_get_storage_keys_only_from_the_manifests_env_from(stage):
    """The rehearsal can fail: without the manifest's envFrom a pod has no storage keys, and the submitter
    never has any (KubeRay gives it none)."""
    cluster = stage.cluster("env-check")
    spec = copy.deepcopy(cluster.spec)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert "AWS_SECRET_ACCESS_KEY" in container_env(ray_container(group), stage.secret_data)
        ray_container(group).pop("envFrom")
        assert not [k for k in container_env(ray_container(group), stage.secret_data) if k.startswith("AWS_")]
    submitter = stage.submitter(cluster, "env-check-submitter")
    assert not [k for k in submitter.env if k.startswith("AWS_")]


def test_the_submitter_shell_splits_an_entrypoint_with_operators(tmp_path):
    """What the old entrypoint did under BuildJobSubmitCommand, with stub `ray` and `python` commands: the
    submitter's shell runs the part after `&&` itself, outside the Ray job."""
    calls = tmp_path / "calls"
    for name in ("ray", "python"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/bash\necho "{name} $*" >> {calls}\n[ "$2" != status ]\n')
        stub.chmod(0o755)
    rayjob = {"spec": {"entrypoint": "python jobs/prepare.py c.yaml && python jobs/train.py c.yaml"}}
    command = job_submit_command(rayjob, "http://127.0.0.1:1", "id-1").replace("python -c", "true")
    subprocess.run(
        ["/bin/bash", "-ce", "--", command], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, check=True, timeout=60
    )
    lines = calls.read_text().splitlines()
    submits = [line for line in lines if line.startswith("ray job submit")]
    assert len(submits) == 1 and submits[0].endswith("-- python jobs/prepare.py c.yaml"), lines
    assert "python jobs/train.py c.yaml" in lines, "train ran in the submitter, not in the Ray job"
