"""`raylm sweep` with run.trackers=[mlflow] against a real `mlflow server`: one parent run for the sweep, a child
run per trial nested under it with its values, status and ASHA decisions, read back through MlflowClient.

Slow: the server's start, and the sweep's own local Ray (started by `raylm sweep` in a process whose environment
holds MLFLOW_TRACKING_URI, as a user's shell does; the session's Ray was started without it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from raylm.config import to_dict
from raylm.train.tracking.ids import read_record
from raylm.train.tracking.mlflow_run import PARENT_TAG
from tests.conftest import REPO_ROOT
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.slow
BUDGET = 9 * 256  # rungs at 256 and 768 tokens: steps 1 and 3 at batch 8 of 32 tokens


def test_a_sweep_is_one_parent_run_with_a_child_per_trial(small_config, tmp_path):
    from mlflow import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-2, 1.0e-5, 2.0e-5]}\n")
    cfg = small_config(
        "unused",
        "tune.name=tracked",
        "tune.num_samples=1",
        f"tune.budget_tokens={BUDGET}",
        "train.eval_samples=16",
        "tune.max_concurrent=1",
        "run.trackers=[mlflow]",
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    command = [sys.executable, "-m", "raylm.cli", "sweep", str(config_file), str(space)]
    with mlflow_server(tmp_path) as uri, tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "sweeps", "RAY_TMPDIR": ray_tmp}
        assert subprocess.run(command, env=env, cwd=REPO_ROOT, timeout=900).returncode == 0
        sweep_dir = Path(cfg.run.dir) / "tracked"
        client = MlflowClient(uri)
        parent = read_record(sweep_dir, "mlflow")["run_id"]
        experiment = client.get_run(parent).info.experiment_id
        runs = client.search_runs([experiment])
        children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent]
        trials = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
        decisions = [json.loads(line) for line in (sweep_dir / "decisions.jsonl").read_text().splitlines()]
        assert len(runs) == 1 + len(trials) == 1 + len(children) == 4
        artifacts = {a.path for a in client.list_artifacts(parent)}
        assert {"space.json", "trials.jsonl", "decisions.jsonl", "sweep.md", "best.yaml"} <= artifacts
        by_trial = {c.data.tags["raylm.trial_id"]: c for c in children}
        for trial in trials:
            child = by_trial[trial["trial_id"]]
            assert json.loads(child.data.tags["raylm.values"]) == trial["params"]
            assert child.data.tags["raylm.status"] == trial["status"]
            assert float(child.data.params["optim.lr"]) == trial["params"]["optim.lr"]
            for decision in (d for d in decisions if d["trial"] == trial["trial_id"]):
                assert json.loads(child.data.tags[f"raylm.rung{decision['rung']}"])["action"] in (
                    "continue",
                    "pause",
                    "stop",
                )
            history = client.get_metric_history(child.info.run_id, "tokens")
            assert sorted(m.step for m in history) == list(range(trial["steps"]))
        assert any(t["status"] == "stopped" for t in trials)
