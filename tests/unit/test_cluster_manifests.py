"""The cluster image and manifests: pinned Ray everywhere, Ray starts first, token auth on, dashboard kept inside."""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
LAUNCHER = CLUSTER / "gpu-cluster.yaml"
KUBERAY = [CLUSTER / "kuberay-raycluster.yaml", CLUSTER / "kuberay-rayjob.yaml"]
# Commands that install software or never return: none may run in a node before `ray start`.
INSTALL_OR_BLOCK = re.compile(
    r"\b(pip3?|conda|mamba|uv|apt(-get)?|yum|dnf|apk)\b.*\binstall\b|\bsleep\b|\btail -f\b"
    r"|\bwait\b|--block\b|\bmount\b"
)
LOOPBACK = ("127.0.0.1", "localhost")


def pinned_ray_version() -> str:
    """The Ray version pyproject.toml pins (ray[...]==X.Y.Z)."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [
        m.group(2) for dep in deps if (m := re.match(r"ray(\[[^\]]*\])?==([\w.]+)$", dep.replace(" ", "")))
    ]
    assert len(pins) == 1, f"pyproject.toml must pin Ray exactly once (ray[...]==X.Y.Z), found {deps}"
    return pins[0]


def test_ray_pin_is_the_installed_ray():
    import ray

    assert pinned_ray_version() == ray.__version__


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile line, comments dropped and continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_image_builds_on_the_official_ray_gpu_image_of_the_pinned_version():
    bases = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert len(bases) == 1
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py3\d+-(gpu|cu\d+)", bases[0].split()[0])
    assert match, f"FROM {bases[0]}: build on rayproject/ray:<version>-<python>-gpu (ray-ml is discontinued)"
    assert match.group(1) == pinned_ray_version()


def install_line() -> str:
    """The Dockerfile's `pip install` command (the one RUN line that installs raylm)."""
    runs = [args for op, args in dockerfile_instructions() if op == "RUN" and "pip install" in args]
    assert len(runs) == 1, "the Dockerfile installs raylm in exactly one RUN pip install line"
    return next(part.strip() for part in runs[0].split("&&") if "pip install" in part)


def copied_into_image() -> dict[str, str]:
    """Build-context path -> absolute path in the image, from COPY lines (destinations relative to WORKDIR)."""
    workdir, copies = "/", {}
    for op, args in dockerfile_instructions():
        if op == "WORKDIR":
            workdir = args.strip()
        if op == "COPY":
            *sources, dest = [p for p in shlex.split(args) if not p.startswith("--")]
            into_dir = len(sources) > 1 or dest.endswith("/") or dest == "."
            base = posixpath.normpath(posixpath.join(workdir, dest))
            copies.update(
                {src: posixpath.join(base, Path(src).name) if into_dir else base for src in sources}
            )
    return copies


def replay_copies(image_root: Path) -> None:
    """The image's COPY lines, into a folder standing for the image's root."""
    for source, dest in copied_into_image().items():
        target = image_root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (REPO_ROOT / source).is_dir() else shutil.copy2
        copy(
            REPO_ROOT / source,
            target,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )


def test_install_step_makes_raylm_importable(tmp_path):
    """Replay the image's COPY lines and its pip install line (no dependencies: the venv has them) into a folder,
    then import raylm from there in a fresh interpreter started outside the repository."""
    image_root = tmp_path / "image"
    replay_copies(image_root)
    args = shlex.split(install_line())[2:]  # after "pip install"
    targets = [a for a in args if not a.startswith("-")]
    assert targets and all(t.startswith("/") for t in targets), f"install an image path: {install_line()}"
    assert "-e" not in args and "--editable" not in args, (
        "install raylm into site-packages, not as an editable link"
    )
    site = tmp_path / "site"
    options = [a for a in args if a.startswith("-")]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        *options,
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--quiet",
        "--target",
        str(site),
        *[str(image_root / t.lstrip("/")) for t in targets],
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    probe = subprocess.run(
        [sys.executable, "-c", "import raylm.cli, raylm.train.worker; print(raylm.__file__)"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(site))


def image_fields(node) -> list[str]:
    """Every `image:` value anywhere in a YAML tree."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            img for v in node.values() for img in image_fields(v)
        ]
    if isinstance(node, list):
        return [img for v in node for img in image_fields(v)]
    return []


def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_every_manifest_uses_the_one_documented_raylm_image_tag():
    images = {img for path in [LAUNCHER, *KUBERAY] for img in image_fields(load(path))}
    assert len(images) == 1, f"one image tag for every node of every manifest, found {sorted(images)}"
    image = images.pop()
    assert "ray-ml" not in image and pinned_ray_version() in image.split(":")[-1]
    assert f"-t {image}" in DOCKERFILE.read_text(), "the Dockerfile's build command names the manifests' tag"
    assert image in (CLUSTER / "README.md").read_text(), "cluster/README.md documents the tag"


def kuberay_cluster_specs() -> list[tuple[str, dict]]:
    """(file name, RayClusterSpec) of the RayCluster and the RayJob's cluster."""
    specs = []
    for path in KUBERAY:
        doc = load(path)
        specs.append((path.name, doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]))
    return specs


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,spec", kuberay_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_pins_ray_starts_ray_first_and_turns_auth_on(name, spec):
    assert spec["rayVersion"] == pinned_ray_version(), name
    for container in ray_containers(spec):
        # KubeRay runs `<command/args> && ray start ...`: anything here that blocks or installs delays or stops Ray.
        script = " ".join(map(str, [*container.get("command", []), *container.get("args", [])]))
        assert not INSTALL_OR_BLOCK.search(script), (
            f"{name}: {container['name']} runs {script!r} before ray start"
        )
        assert not container.get("command") or "ray start" not in script
    assert spec.get("authOptions", {}).get("mode") == "token" or all(
        _env(c).get("RAY_AUTH_MODE") == "token" and "secretKeyRef" in str(_env_from(c, "RAY_AUTH_TOKEN"))
        for c in ray_containers(spec)
    ), f"{name}: token authentication must be on"


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _env_from(container: dict, name: str):
    return next((e.get("valueFrom") for e in container.get("env", []) if e["name"] == name), None)


@pytest.mark.parametrize("name,spec", kuberay_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_dashboard_reachable_in_cluster_never_public(name, spec):
    head = spec["headGroupSpec"]
    host = str(head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0"))
    assert host not in LOOPBACK, f"{name}: the job submitter reaches the dashboard through the head Service"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
        f"{name}: the head Service must stay ClusterIP"
    )
    assert not head.get("enableIngress", False), f"{name}: no Ingress to the dashboard"


def test_no_manifest_publishes_a_service_or_ingress():
    for path in [LAUNCHER, *KUBERAY]:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("kind") not in ("Service", "Ingress"), path.name
            assert not re.search(r"\b(LoadBalancer|NodePort)\b", yaml.safe_dump(doc)), path.name


def test_launcher_starts_ray_first_with_auth_and_a_local_dashboard():
    config = load(LAUNCHER)
    before_ray = [
        *config.get("initialization_commands", []),
        *config.get("setup_commands", []),
        *config.get("head_setup_commands", []),
        *config.get("worker_setup_commands", []),
    ]
    assert not [c for c in before_ray if INSTALL_OR_BLOCK.search(c)], before_ray
    assert not [c for c in before_ray if "pip" in c], "raylm is installed in the image, not on the nodes"
    starts = [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]
    assert not [c for c in starts if "ray start" in c and INSTALL_OR_BLOCK.search(c)]
    run_options = " ".join(config["docker"].get("run_options", []))
    assert re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token", run_options) or all(
        "RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c
    ), "token authentication on every node"
    assert any(target.endswith(".ray/auth_token") for target in config.get("file_mounts", {})), (
        "every node needs the same token: mount the file `ray get-auth-token --generate` wrote"
    )
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start, (
        "the launcher's dashboard is reached through the SSH tunnel"
    )
    assert "0.0.0.0" not in LAUNCHER.read_text()


def test_runs_and_data_default_to_object_storage_and_no_pod_needs_a_volume_claim():
    """Prepared data and run folders on s3 (issue 14): the RayJob's entrypoint, the README's variables and
    gpt2-small.yaml name s3:// URIs, and no manifest requires a ReadWriteMany claim (a shared volume is optional)."""
    entrypoint = load(CLUSTER / "kuberay-rayjob.yaml")["spec"]["entrypoint"]
    assert entrypoint.count("data.out_dir=s3://") == 1 and entrypoint.count("run.dir=s3://") == 1
    assert entrypoint.count("data.paths=s3://") == 1, "a real job names its corpus on object storage"
    readme = (CLUSTER / "README.md").read_text()
    assert re.search(r"export RAYLM_DATA=s3://", readme) and re.search(r"export RAYLM_RUNS=s3://", readme)
    from raylm.config import load_config

    gpt2 = load_config(REPO_ROOT / "jobs" / "configs" / "gpt2-small.yaml")
    assert gpt2.run.dir.startswith("s3://") and gpt2.data.out_dir.startswith("s3://")
    for path in KUBERAY:
        spec = load(path)["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            claims = [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
            assert claims == [], f"{path.name}: runs live on object storage, no pod needs a volume claim"


def test_gpt2_small_asks_for_gpus():
    from raylm.config import load_config

    assert load_config(REPO_ROOT / "jobs" / "configs" / "gpt2-small.yaml").parallel.use_gpu == "true"


def test_docs_give_the_client_token_commands():
    for path in (REPO_ROOT / "README.md", CLUSTER / "README.md"):
        text = path.read_text()
        assert "export RAY_AUTH_MODE=token" in text and "ray get-auth-token" in text, path.name


# Words KubeRay's submitter shell passes through unchanged: anything else (&&, ;, |, $, backticks, <, >,
# quotes, globs, braces) is read by `/bin/bash -ce` itself: BuildJobSubmitCommand puts the entrypoint there
# unquoted.
SHELL_INERT_WORD = re.compile(r"[\w@%+=:,./-]+")


def test_rayjob_entrypoint_is_one_command_the_submitter_shell_leaves_alone():
    """KubeRay runs `... ray job submit --no-wait ... -- <entrypoint> ; fi ; ray job logs ...` under
    /bin/bash -ce: `a && b` would submit only `a` and run `b` in the 1-CPU submitter pod. One command,
    shell-inert words only."""
    entrypoint = load(CLUSTER / "kuberay-rayjob.yaml")["spec"]["entrypoint"]
    bad = [word for word in entrypoint.split() if not SHELL_INERT_WORD.fullmatch(word)]
    assert not bad, f"entrypoint words the submitter's shell would interpret: {bad}; use jobs/pretrain.py"
    words = entrypoint.split()
    assert words[:2] == ["python", "/home/ray/raylm/jobs/pretrain.py"], words[:2]
    assert any(w.startswith("run.name=") for w in words), "a fixed run.name: a retried RayJob resumes it"


@pytest.mark.parametrize("bad", ["a && b", "a; b", "a | b", "a $HOME", "a `b`", "a > log", "a 2>&1", "'a b'"])
def test_shell_inert_words_reject_shell_operators(bad):
    assert not all(SHELL_INERT_WORD.fullmatch(word) for word in bad.split())


def test_rayjob_retries_on_a_new_cluster_and_removes_it_when_done():
    spec = load(CLUSTER / "kuberay-rayjob.yaml")["spec"]
    assert spec.get("backoffLimit", 0) >= 1, "a preempted RayJob is retried (each retry resumes the run)"
    assert spec.get("shutdownAfterJobFinishes") is True


@pytest.mark.parametrize("name,spec", kuberay_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_kuberay_pod_gets_storage_credentials_both_ways(name, spec):
    """Every rank uploads its own checkpoint files: the head and every worker pod run as the ServiceAccount
    (IRSA, Pod Identity, Workload Identity) and load the storage Secret (endpoint and keys) into the Ray
    container."""
    account = yaml.safe_load((CLUSTER / "kuberay-serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod.get("serviceAccountName") == account["metadata"]["name"], name
        sources = pod["containers"][0].get("envFrom", [])
        secrets = [src["secretRef"]["name"] for src in sources if "secretRef" in src]
        assert secrets == ["raylm-storage"], f"{name}: the Ray container loads the storage Secret by envFrom"
    text = (CLUSTER / "kuberay-serviceaccount.yaml").read_text()
    assert "eks.amazonaws.com/role-arn" in text and "iam.gke.io/gcp-service-account" in text
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl create secret generic raylm-storage" in readme and "kuberay-serviceaccount.yaml" in readme


def test_launcher_workers_have_credentials_a_pinned_ami_a_registry_login_and_a_region():
    config = load(LAUNCHER)
    assert config["provider"].get("region")
    for name, node_type in config["available_node_types"].items():
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node_type["node_config"].get("ImageId", "")), (
            f"{name}: pin ImageId (the launcher's built-in default AMI is too old for H100s)"
        )
        if name != config["head_node_type"]:  # the launcher gives its default profile to the head only
            profile = node_type["node_config"].get("IamInstanceProfile", {})
            assert "Arn" in profile or "Name" in profile, f"{name}: no storage credentials"
    assert "get-parameter" in LAUNCHER.read_text(), "say how to look up the region's current AMI id"
    registry = config["docker"]["image"].split("/")[0]
    logins = [c for c in config.get("initialization_commands", []) if "docker login" in c]
    assert logins and all(c.rstrip().endswith(registry) and "--password-stdin" in c for c in logins), (
        "log in to the image's registry before `docker pull`, the password on stdin (never in the file)"
    )


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "runs"} <= ignored


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_dockerfile_install_line_installs_raylm_with_its_dependencies_in_a_fresh_venv(tmp_path):
    """Where no image can be built here: the Dockerfile's RUN line itself (its pip install with every
    dependency, then its import check) in a fresh virtualenv, over the files its COPY lines put in the image.
    A broken install line, a missing dependency or a package the COPY lines leave out fails this test."""
    image_root = tmp_path / "image"
    replay_copies(image_root)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    run_line = next(args for op, args in dockerfile_instructions() if op == "RUN" and "pip install" in args)
    script = run_line.replace("/home/ray/", f"{image_root}/home/ray/")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    env |= {k: v for k, v in os.environ.items() if k.startswith("PIP_")}  # this machine's package index
    done = subprocess.run(
        ["/bin/bash", "-ec", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
