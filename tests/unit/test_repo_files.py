"""Every YAML under cluster/, jobs/ and tune_spaces/ loads, and the files and commands they name exist."""

import re

import pytest
import yaml

from raylm.config import load_config
from tests.conftest import REPO_ROOT

YAML_FILES = sorted(
    p for folder in ("cluster", "jobs", "tune_spaces") for p in (REPO_ROOT / folder).rglob("*.yaml")
)
DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "cluster" / "README.md"]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_yaml_loads_safely(path):
    for document in yaml.safe_load_all(path.read_text()):
        assert document is not None


@pytest.mark.parametrize(
    "path", sorted((REPO_ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_run_configs_validate(path):
    load_config(path)


def referenced_repo_paths(text: str) -> set[str]:
    return set(re.findall(r"\b((?:jobs|cluster|benchmarks|docs|tune_spaces)/[\w./-]+\.(?:py|yaml|md))", text))


@pytest.mark.parametrize("path", DOCS + YAML_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_named_files_exist(path):
    missing = [ref for ref in referenced_repo_paths(path.read_text()) if not (REPO_ROOT / ref).exists()]
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_runtime_env_holds_no_secrets():
    env = yaml.safe_load((REPO_ROOT / "jobs" / "runtime_env.yaml").read_text())
    names = " ".join(env.get("env_vars", {})).upper()
    assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", names)


def test_readme_gives_the_two_setup_commands_and_ci_calls_the_test_one():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
