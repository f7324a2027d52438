"""The pods and RayJob submitter KubeRay would build from cluster/*.yaml, run as local processes for tests.

Each function mirrors one KubeRay function (ray-operator, controllers/ray/common/pod.go and job.go, named in
docs/cluster-rehearsal.md), so a change of the manifests changes what runs here exactly as on Kubernetes.
What this one machine cannot give a pod (its own network address, GPUs, the ports of the manifest, a private
/tmp) is changed afterwards by `localize`, in one place, and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.s3_server import free_port

BIN = Path(sys.executable).parent  # stands in for the image's PATH: python, ray and raylm are there
KUBERAY_METRICS_PORT = "8080"  # utils.DefaultMetricsPort
KUBERAY_AGENT_LISTEN_PORT = "52365"  # utils.DefaultDashboardAgentListenPort
HEAD_SERVICE = "raylm-head-svc.default.svc.cluster.local"  # what workers and the submitter would dial
# convertParamMap's specialParameterOptions: flags that take an explicit true/false value
BOOL_VALUED = ("log-color", "include-dashboard", "include-log-monitor")


def quantity(text) -> float:
    """A Kubernetes resource quantity ("8", "500m", "32Gi", "1e3") as a number."""
    match = re.fullmatch(r"([0-9.e+-]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    scale = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }[match.group(2)]
    return float(match.group(1)) * scale


def start_params(group: dict, head: bool, head_address: str = f"{HEAD_SERVICE}:6379") -> dict[str, str]:
    """setMissingRayStartParams, then generateRayStartCommand's resource fill-in from the Ray container's
    limits (num-cpus and memory; num-gpus from nvidia.com/gpu, addWellKnownAcceleratorResources)."""
    params = {str(k): str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", head_address)
    params.setdefault("metrics-export-port", KUBERAY_METRICS_PORT)
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", KUBERAY_AGENT_LISTEN_PORT)
    limits = ray_container(group).get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(math.ceil(quantity(limits["cpu"])))  # resource.Quantity.Value() rounds up
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(math.ceil(quantity(limits["memory"])))
    if "num-gpus" not in params and quantity(limits.get("nvidia.com/gpu", 0)):
        params["num-gpus"] = str(math.ceil(quantity(limits["nvidia.com/gpu"])))
    return params


def ray_start_command(params: dict[str, str], head: bool) -> str:
    """BuildPod's container args: `ulimit ...; ray start [--head] <convertParamMap(params)>` (keys sorted, a
    true/false value as a bare flag)."""
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in BOOL_VALUED:
            flags += f" --{key} " if value.lower() == "true" else ""
        else:
            flags += f" --{key}={value} "
    ray_start = "ray start --head" if head else "ray start"
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start} {flags}"


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # utils.RayContainerIndex


def container_env(container: dict, secret_data: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom Secrets (an optional one that does not exist adds
    nothing), then `env` entries, a secretKeyRef read from the rendered Secret."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["secretRef"]  # the manifests use Secrets only; a configMapRef would fail here
        if ref["name"] in secret_data:
            env.update({source.get("prefix", "") + k: v for k, v in secret_data[ref["name"]].items()})
        else:
            assert ref.get("optional"), f"Secret {ref['name']} does not exist: the pod would not start"
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_data[ref["name"]][ref["key"]]
    return env


def kuberay_env(
    head: bool,
    cluster_name: str,
    group_name: str,
    start_cmd: str,
    env: dict[str, str],
    secret_data: dict[str, dict[str, str]],
    head_host: str = HEAD_SERVICE,
    head_port: str = "6379",
) -> dict[str, str]:
    """setContainerEnvVars and SetContainerTokenAuthEnvVars (authOptions mode token; the token from the Secret
    named after the cluster, key auth_token): what KubeRay adds to the Ray container's environment."""
    ip = "127.0.0.1" if head else head_host  # utils.LOCAL_HOST on the head, the head Service's FQDN elsewhere
    added = {} if head else {"FQ_RAY_IP": ip, "RAY_IP": ip.split(".")[0]}
    added |= {
        "RAY_CLUSTER_NAME": cluster_name,
        "RAY_CLUSTER_NAMESPACE": "default",
        "RAY_CLOUD_INSTANCE_ID": f"{cluster_name}-{group_name}",
        "RAY_NODE_TYPE_NAME": group_name,
        "KUBERAY_GEN_RAY_START_CMD": start_cmd,
    }
    out = {**env, **added}
    out.setdefault("RAY_PORT", head_port)
    out.setdefault("RAY_ADDRESS", f"{ip}:{head_port}")
    out.setdefault("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")
    if head:
        out["RAY_USAGE_STATS_EXTRA_TAGS"] = "kuberay_version=rehearsal;kuberay_crd=RayJob"
    out.setdefault("RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "1")
    out.setdefault("RAY_AUTH_MODE", "token")
    out.setdefault("RAY_AUTH_TOKEN", secret_data[cluster_name]["auth_token"])
    return out


def health_command(url: str) -> str:
    """utils.BasePythonHealthCommand with RayDashboardGCSHealthCheckTimeoutSeconds."""
    return (
        f"python -c \"import urllib.request; r=urllib.request.urlopen('{url}', timeout=5); "
        f"exit(0 if b'success' in r.read() else 1)\""
    )


def job_submit_command(rayjob: dict, address: str, job_id: str) -> str:
    """BuildJobSubmitCommand in K8sJobMode, joined with spaces as configureSubmitterContainer does."""
    spec = rayjob["spec"]
    cmd = [
        "until",
        health_command(f"{address}/api/gcs_healthz"),
        ">/dev/null",
        "2>&1",
        ";",
        "do",
        "echo",
        json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."),
        ";",
        "sleep",
        "2",
        ";",
        "done",
        ";",
    ]
    cmd += [
        "if",
        "!",
        "ray",
        "job",
        "status",
        "--address",
        address,
        job_id,
        ">/dev/null",
        "2>&1",
        ";",
        "then",
    ]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):  # yaml.YAMLToJSON (Go maps: sorted keys), then strconv.Quote
        runtime_env = json.dumps(
            __import__("yaml").safe_load(spec["runtimeEnvYAML"]), sort_keys=True, separators=(",", ":")
        )
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--submission-id", job_id]
    for key, flag in (
        ("entrypointNumCpus", "--entrypoint-num-cpus"),
        ("entrypointNumGpus", "--entrypoint-num-gpus"),
    ):
        if spec.get(key):
            cmd += [flag, f"{float(spec[key]):f}"]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def submitter_env(address: str, job_id: str, token: str, base: dict[str, str]) -> dict[str, str]:
    """configureSubmitterContainer: the image's environment plus exactly these (no storage credentials)."""
    return {
        **base,
        "PYTHONUNBUFFERED": "1",
        "RAY_DASHBOARD_ADDRESS": address.removeprefix("http://"),
        "RAY_JOB_SUBMISSION_ID": job_id,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }


@dataclass
class Pod:
    """One "pod": a `/bin/bash -c -- <args>` process in a session of its own, with its own HOME and TMPDIR."""

    name: str
    args: str
    env: dict[str, str]
    root: Path
    shell: tuple[str, ...] = ("/bin/bash", "-c", "--")  # utils.GetContainerCommand; the submitter adds -e
    process: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.root / "pod.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*self.shell, self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )


def image_env(root: Path) -> dict[str, str]:
    """What the image's own environment holds: PATH with raylm's interpreter, a HOME and /tmp of the pod's own
    (no ~/.aws, no ~/.ray/auth_token of this machine), and nothing else of this test process."""
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "LANG": "C.UTF-8",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # The image would carry DeepSpeed's one JIT-built op: every pod shares one build, kept with this
    # interpreter (a build shared with other checkouts' interpreters is rebuilt whenever they alternate).
    env["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return env


def kill_pod_tree(pods: list[Pod], sig=signal.SIGKILL) -> None:
    """Signal every process of these pods, by pid, never by name: each pod's session (every pod starts one),
    and any process whose command line names a pod's folder (Ray daemons and workers carry their temp dir)."""
    sessions = {p.process.pid for p in pods if p.process is not None}
    for pid in {*pids_under([str(p.root) for p in pods]), *pids_in_sessions(sessions)}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def pids_in_sessions(sessions: set[int]) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if os.getsid(int(proc.name)) in sessions:
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def pids_under(roots: list[str]) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(root in cmdline for root in roots):
            found.append(int(proc.name))
    return found


def stop_pods(pods: list[Pod]) -> None:
    """SIGTERM (ray start --block stops what it started), then SIGKILL what is left; wait for the pods."""
    kill_pod_tree(pods, signal.SIGTERM)
    sessions = {p.process.pid for p in pods if p.process is not None}
    deadline = time.time() + 20
    while time.time() < deadline and (pids_under([str(p.root) for p in pods]) or pids_in_sessions(sessions)):
        time.sleep(0.5)
    kill_pod_tree(pods, signal.SIGKILL)
    for pod in pods:
        if pod.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pod.process.wait(timeout=30)


def new_root(prefix: str) -> Path:
    """A short folder under /tmp: Ray's socket paths must stay under the 107-byte Unix limit."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def new_token() -> str:
    return secrets.token_hex(32)


OBJECT_STORE_BYTES = 150 * 2**20  # three "pods" share this machine's /dev/shm


@dataclass
class RehearsalCluster:
    """A RayCluster spec run as a head pod and its worker pods (each group's `replicas`), every pod a process
    tree of its own; start() returns once every pod's raylet is in the cluster."""

    spec: dict  # a RayClusterSpec: the RayCluster's spec or the RayJob's rayClusterSpec
    name: str
    secret_data: dict[str, dict[str, str]]
    root: Path
    worker_cpus: int = 2
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    pods: list[Pod] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def localize(self, params: dict[str, str], pod_root: Path, head: bool) -> dict[str, str]:
        """The only changes to what KubeRay generates, each forced by running every pod on one machine."""
        params = dict(params)
        params["temp-dir"] = str(pod_root / "ray")  # each pod's own /tmp/ray
        for port in (
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        ):  # fixed ports (8080, 52365) exist once per machine
            params[port] = str(free_port())
        params["object-store-memory"] = str(OBJECT_STORE_BYTES)
        if head:
            params["port"] = str(self.gcs_port)  # KubeRay leaves Ray's default, 6379
            params["dashboard-port"] = str(self.dashboard_port)  # 8265
            params["dashboard-host"] = "127.0.0.1"  # loopback: never a public interface
        else:
            params["num-cpus"] = str(self.worker_cpus)  # the manifest's CPU limit; this machine has 2 cores
            params.pop("num-gpus", None)  # no GPUs here: the CPU run config trains on CPU workers
            params.pop("memory", None)  # the manifest's 1000Gi limit; Ray's own default fits this machine
        return params

    def pod(self, group: dict, head: bool, name: str) -> Pod:
        root = self.root / name
        root.mkdir(parents=True)
        head_address = f"127.0.0.1:{self.gcs_port}"  # the head Service's FQDN:6379
        params = self.localize(start_params(group, head, head_address), root, head)
        args = ray_start_command(params, head)
        container = ray_container(group)
        env = {**image_env(root), **container_env(container, self.secret_data)}
        env = kuberay_env(
            head,
            self.name,
            group.get("groupName", "headgroup"),
            args.split("; ", 1)[1],
            env,
            self.secret_data,
            head_host="127.0.0.1",
            head_port=str(self.gcs_port),
        )
        return Pod(name, args, env, root)

    def start(self, timeout_s: float = 240) -> RehearsalCluster:
        head = self.pod(self.spec["headGroupSpec"], True, "head")
        self.pods.append(head)
        head.start()
        self.wait_gcs(head, timeout_s)  # the workers' wait-gcs-ready init container
        for group in self.spec.get("workerGroupSpecs", []):
            for index in range(int(group.get("replicas", 1))):
                worker = self.pod(group, False, f"{group['groupName']}-{index}")
                self.pods.append(worker)
                worker.start()
                # one raylet registering at a time: this machine's 2 cores are shared by every pod
                self.wait_nodes(len(self.pods), timeout_s)
        return self

    def wait_gcs(self, head: Pod, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert head.process.poll() is None, f"the head pod exited: {head.log.read_text()[-3000:]}"
            probe = subprocess.run(
                ["ray", "health-check", "--address", f"127.0.0.1:{self.gcs_port}"],
                env=head.env,
                capture_output=True,
                timeout=60,
            )
            if probe.returncode == 0:
                return
            time.sleep(2)
        raise AssertionError(f"GCS not ready in {timeout_s} s: {head.log.read_text()[-3000:]}")

    def nodes(self) -> list[dict]:
        """Alive Ray nodes from the state API, asked as a client holding the cluster's token."""
        env = {
            **image_env(self.root / "client"),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.secret_data[self.name]["auth_token"],
        }
        out = subprocess.run(
            [
                "ray",
                "list",
                "nodes",
                "--address",
                self.dashboard,
                "--format",
                "json",
                "--detail",
                "--filter",
                "state=ALIVE",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        start = out.stdout.find("[")  # the state CLI may print a warning line first
        try:
            return json.loads(out.stdout[start:]) if out.returncode == 0 and start >= 0 else []
        except json.JSONDecodeError:
            return []  # nodes still registering: asked again

    def wait_nodes(self, count: int, timeout_s: float) -> None:
        """Until `count` nodes are alive. A worker pod whose Ray container exits is restarted, as the kubelet
        restarts it (restartPolicy Always): on a loaded machine `ray start` can give up on its raylet's
        registration (a fixed 30 s in Ray 2.60) before the raylet is through."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            head = self.pods[0]
            assert head.process.poll() is None, f"the head pod exited: {head.output()[-3000:]}"
            for pod in self.pods[1:]:
                if pod.process.poll() is not None:
                    kill_pod_tree([pod])  # every process of the container goes with it
                    pod.start()
            if len(self.nodes()) == count:
                return
            time.sleep(2)
        raise AssertionError(f"{count} Ray nodes not up in {timeout_s} s: {self.pods[-1].output()[-3000:]}")

    def stop(self) -> None:
        stop_pods(self.pods)
