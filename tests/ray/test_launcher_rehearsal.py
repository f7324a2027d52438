"""cluster/gpu-cluster.yaml rehearsed: its start commands on a head and two worker "nodes", then the README's
"On a cluster" commands verbatim (prepare, train, resume, export, generate on s3://) from a fresh shell.

The nodes run the launcher's own wrapping of head_start_ray_commands / worker_start_ray_commands
(tests/ray/launcher_rehearsal.py, with `$RAY_HEAD_IP` and the other substitutions). What differs from EC2, and
why: `ray stop` is not run (it would stop every Ray of this user on this shared machine); the GCS and the
dashboard get free ports and no autoscaling config (its monitor would start EC2 instances); each node its own
temp dir, CPUs for GPUs, a small object store; the instance profile's credentials are AWS_* variables in the
nodes' environment (endpoint: a moto S3 server on 127.0.0.1 holding the README's own bucket, `your-bucket`).
The client shell holds only what the README tells a user to export: RAY_AUTH_MODE, RAY_ADDRESS (the tunnel's
local port: here the dashboard's own free port instead of 8265) and the AWS_* variables, plus PATH and a HOME
with the token file `ray get-auth-token --generate` wrote (cluster/README.md), which file_mounts copies to
every node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.ray.kuberay_rehearsal import BIN, Pod, image_env, kill_pod_tree, new_root, stop_pods
from tests.ray.launcher_rehearsal import node_pod
from tests.s3_server import DUMMY_KEYS, client, free_port, keys, s3_server

LAUNCHER = REPO_ROOT / "cluster" / "gpu-cluster.yaml"
BUCKET = "your-bucket"


def readme_cluster_blocks() -> tuple[str, str]:
    """The README's "On a cluster" section: (its first bash block, the object-storage block, `S3=...`)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    storage = next(b for b in blocks if b.startswith("S3=s3://"))
    return blocks[0], storage


def readme_exports(block: str, dashboard: str) -> dict[str, str]:
    """The variables the README's first block exports for a client; the tunnel's port is the dashboard's."""
    exports = {}
    for line in block.splitlines():
        if line.startswith("export "):
            for assignment in line.split("#")[0].split()[1:]:
                name, value = assignment.split("=", 1)
                exports[name] = value
    exports["RAY_ADDRESS"] = exports["RAY_ADDRESS"].replace("http://127.0.0.1:8265", dashboard)
    return {k: v for k, v in exports.items() if k.startswith("RAY_")}


def start_node(node: Pod, attempts: int = 3) -> None:
    """Run a node's start commands; a node whose update fails is replaced by a fresh one, as the launcher
    replaces it (here: its processes killed, the commands run again). On this loaded machine `ray start` can
    give up on its raylet's registration (a fixed 30 s in Ray 2.60) before the raylet is through."""
    for _ in range(attempts):
        node.start()
        if node.process.wait(timeout=300) == 0:
            return
        kill_pod_tree([node])
    raise AssertionError(f"{node.name} did not start: {node.output()[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three nodes, then the README's prepare and 300 tiny steps: 15-25 minutes here
def test_launcher_cluster_runs_the_readme_commands_verbatim():
    config = yaml.safe_load(LAUNCHER.read_text())
    root = new_root("rll-")
    nodes = []
    try:
        with s3_server() as endpoint:
            client(endpoint).create_bucket(Bucket=BUCKET)
            storage_env = {"AWS_ENDPOINT_URL": endpoint, **DUMMY_KEYS}
            user = image_env(root / "user")  # the user's machine: `ray get-auth-token --generate` (README)
            subprocess.run(
                [str(BIN / "ray"), "get-auth-token", "--generate"],
                env=user,
                check=True,
                capture_output=True,
                timeout=120,
            )
            gcs_port, dashboard_port = free_port(), free_port()
            head = node_pod(
                config,
                config["head_node_type"],
                "head",
                root / "head",
                "127.0.0.1",
                gcs_port,
                dashboard_port,
                storage_env,
                root / "user" / "home",
            )
            nodes.append(head)
            start_node(head)
            worker_type = next(t for t in config["available_node_types"] if t != config["head_node_type"])
            for index in range(config["available_node_types"][worker_type]["min_workers"]):
                worker = node_pod(
                    config,
                    worker_type,
                    f"worker-{index}",
                    root / f"worker-{index}",
                    "127.0.0.1",
                    gcs_port,
                    dashboard_port,
                    storage_env,
                    root / "user" / "home",
                )
                nodes.append(worker)
                start_node(worker)
            first, storage = readme_cluster_blocks()
            shell = {**user, **readme_exports(first, f"http://127.0.0.1:{dashboard_port}"), **storage_env}
            shell.pop("AWS_REGION", None)  # the README names the endpoint and the keys
            started = time.monotonic()
            run = subprocess.run(
                ["/bin/bash", "-e", "-c", storage],
                env=shell,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=3000,
            )
            console = run.stdout + run.stderr
            assert run.returncode == 0, console[-6000:]
            print(f"README commands on the launcher cluster: {time.monotonic() - started:.0f} s")
            objects = keys(endpoint, "raylm/", bucket=BUCKET)
            assert "raylm/runs/t1/checkpoints/step-00000300/manifest.json" in objects, sorted(objects)[-20:]
            assert any(k.startswith("raylm/exports/t1/") and k.endswith(".safetensors") for k in objects)
            assert "def main(" in run.stdout, "generate prints the prompt and its continuation"
    finally:
        stop_pods(nodes)
        shutil.rmtree(root, ignore_errors=True)
