"""MLflow against a real `mlflow server` (SQLite backend, artifacts in a temporary folder) started here: a whole
training run whose rank 0 is killed and restarted, then resumed for more steps, lands in one MLflow run with its
params, every metrics.jsonl number at its step once, its tags, config.yaml, loss.png and an export; a run against
a server that is not there trains to its end.

Slow: the server takes 20-40 s to start here (its SQLite schema migrations and job workers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import DP2, train_plain  # noqa: E402

from raylm.checkpoint.export import export  # noqa: E402
from raylm.config import to_dict  # noqa: E402
from raylm.train.driver import finish_tracking, with_absolute_paths  # noqa: E402
from raylm.train.metrics import plot_loss_curve, read_metrics  # noqa: E402
from raylm.train.tracking.after_run import add_export  # noqa: E402
from raylm.train.tracking.base import flatten  # noqa: E402
from raylm.train.tracking.ids import read_record  # noqa: E402
from tests.mlflow_server import mlflow_server  # noqa: E402
from tests.s3_server import free_port  # noqa: E402

pytestmark = [pytest.mark.runs, pytest.mark.slow]
EXACT = ("loss", "lr", "tokens", "samples", "batch_size")  # the same in every attempt (a resume is exact)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


def test_a_restarted_and_resumed_run_is_one_mlflow_run(server, small_config, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "restarts")
    tracked = ("run.trackers=[tensorboard, mlflow]", "fault.max_failures=1", "fault.drill=step@5")
    first = small_config("tracked", *DP2, *tracked)  # rank 0 is killed after step 4; the group restarts at 4
    train_plain(first, 2)
    run = Path(first.run.dir) / first.run.name
    run_id = read_record(run, "mlflow")["run_id"]
    train_plain(small_config("tracked", *DP2, *tracked, "train.max_steps=10"), 2)  # resumed for two more
    assert read_record(run, "mlflow")["run_id"] == run_id
    plot_loss_curve(run)  # what the driver does after a run
    finish_tracking(run)
    export(run, tmp_path / "export")  # what `raylm export` does
    add_export(str(run), str(tmp_path / "export"))

    client = MlflowClient(server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "restarts"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == flatten(to_dict(with_absolute_paths(first)))  # the config it started with
    assert logged.data.tags["raylm.layout"] == "pp=1 tp=1 dp=2 zero=0"
    assert logged.data.tags["raylm.version"]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(10))
    for key in {k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}:
        history = client.get_metric_history(run_id, key)
        expected = [r for r in rows if isinstance(r.get(key), (int, float))]
        assert sorted(m.step for m in history) == [r["step"] for r in expected], key  # each step once
        if key in EXACT:
            assert {m.step: m.value for m in history} == {r["step"]: float(r[key]) for r in expected}, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "loss.png", "export"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/config.json", "export/model.safetensors"} <= exported


def test_a_run_whose_server_is_not_there_trains_to_its_end(small_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    cfg = small_config("no-server", "run.trackers=[tensorboard, mlflow]")
    train_plain(cfg, 1)
    run = Path(cfg.run.dir) / cfg.run.name
    assert [r["step"] for r in read_metrics(run)] == list(range(cfg.train.max_steps))
    assert not read_record(run, "mlflow")
