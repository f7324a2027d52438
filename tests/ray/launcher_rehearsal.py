"""The Ray launcher's node start commands from cluster/gpu-cluster.yaml, run as local processes for tests.

The commands are wrapped by Ray's own launcher functions (ray.autoscaler._private: `with_envs` as
commands.get_or_create_head_node and the v2 RayInstaller call it, `_with_environment_variables` as NodeUpdater
runs each start command), then run inside a stand-in for the node's container (the `docker.run_options` --env
variables, the file_mounts). `localize` lists what one machine forces, and changes nothing else.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.util import with_envs

from tests.ray.kuberay_rehearsal import OBJECT_STORE_BYTES, Pod, image_env
from tests.s3_server import free_port


def start_commands(config: dict, node_type: str, head_ip: str, instance_id: str) -> list[str]:
    """The start commands the launcher runs on a node of `node_type`, with its substitutions."""
    if node_type == config["head_node_type"]:
        commands = with_envs(
            config["head_start_ray_commands"],
            {
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": instance_id,
                "RAY_NODE_TYPE_NAME": node_type,
            },
        )
        extra = {"RAY_USAGE_STATS_ENABLED": 0}  # NodeUpdater, head only (usage stats off here)
    else:
        instance_type = config["available_node_types"][node_type]["node_config"]["InstanceType"]
        commands = with_envs(
            config["worker_start_ray_commands"],
            {
                "RAY_HEAD_IP": head_ip,
                "RAY_CLOUD_INSTANCE_ID": instance_id,
                "RAY_NODE_TYPE_NAME": node_type,
                "RAY_CLOUD_INSTANCE_TYPE_NAME": instance_type,
            },
        )
        extra = {}
    resources = config["available_node_types"][node_type].get("resources") or {}
    if resources:
        extra["RAY_OVERRIDE_RESOURCES"] = resources
    return [_with_environment_variables(command, extra) for command in commands]


def container_env(config: dict, root: Path) -> dict[str, str]:
    """The node container's environment: the image's, plus every `--env K=V` of docker.run_options."""
    env = image_env(root)
    for option in config.get("docker", {}).get("run_options", []):
        match = re.match(r"(?:--env|-e)[ =](\w+)=(\S*)", option)
        if match:
            env[match.group(1)] = match.group(2)
    return env


def mount_files(config: dict, home: Path, source_home: Path) -> None:
    """file_mounts: each remote path under the container's home gets the local file (~ = source_home)."""
    for remote, local in config.get("file_mounts", {}).items():
        target = home / Path(remote).relative_to("/home/ray") if remote.startswith("/home/ray/") else None
        assert target is not None, f"file mount {remote}: the rehearsal maps /home/ray/ only"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(local.replace("~", str(source_home), 1)), target)


def localize(
    command: str, root: Path, head: bool, gcs_port: int, dashboard_port: int, cpus: int
) -> str | None:
    """What this machine forces: None drops `ray stop` (it stops every Ray of this user on the machine, other
    tests' clusters included; a new VM has none); `ray start` keeps its flags but the GCS port (6379 is taken
    once per machine), the autoscaling config (its monitor would start EC2 instances), and gets a temp dir,
    free ports, CPUs for GPUs and a small object store per node."""
    if re.search(r"\bray stop\b", command):
        return None
    if "ray start" not in command:
        return command
    command = re.sub(r" --autoscaling-config=\S+", "", command)
    command = command.replace("--port=6379", f"--port={gcs_port}").replace(":6379", f":{gcs_port}")
    flags = [
        f"--temp-dir={root / 'ray'}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    # CPUs: this machine's cores instead of the instance types' (16 on the head, 192 and 8 GPUs on a worker)
    flags += (
        [f"--dashboard-port={dashboard_port}", "--num-cpus=1"]
        if head
        else [f"--num-cpus={cpus}", "--num-gpus=0"]
    )
    return f"{command} {' '.join(flags)}"


def node_pod(
    config: dict,
    node_type: str,
    name: str,
    root: Path,
    head_ip: str,
    gcs_port: int,
    dashboard_port: int,
    storage_env: dict[str, str],
    token_home: Path,
    cpus: int = 2,
) -> Pod:
    """One node: its start commands joined as the launcher runs them one after another (`docker exec ...
    /bin/bash -c`), in a container environment with the node's storage credentials (the instance profile)."""
    root.mkdir(parents=True)
    env = {**container_env(config, root), **storage_env}
    mount_files(config, root / "home", token_home)
    head = node_type == config["head_node_type"]
    commands = [
        localize(c, root, head, gcs_port, dashboard_port, cpus)
        for c in start_commands(config, node_type, head_ip, f"i-{name}")
    ]
    return Pod(name, " && ".join(c for c in commands if c), env, root, shell=("/bin/bash", "-c", "--"))
