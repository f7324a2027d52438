"""run.trackers through the metrics writer rank 0 uses: MLflow (a file store in this process: the same client
calls as against a server, which the slow tests/distributed/test_tracking_server.py starts with SQLite; a SQLite
store takes seconds of schema migrations to create), W&B offline read back from its run files,
one warning for a server that cannot be reached; each continues its run across a restart without logging a step
twice."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from raylm.config import resolve, to_dict
from raylm.train.metrics import MetricsWriter, read_metrics
from raylm.train.tracking.base import flatten
from raylm.train.tracking.ids import read_record
from tests.s3_server import free_port

pytest.importorskip("mlflow")


def rows(steps: range, attempt: int) -> list[dict]:
    return [
        {
            "step": s,
            "tokens": 64 * (s + 1),
            "loss": 5.0 - s / 10 + attempt / 100,
            "lr": 1e-3,
            "diverged": False,
        }
        | ({"val_loss": 4.5} if s == 7 else {})
        for s in steps
    ]


def attempt(run_dir, tree: dict, start_step: int, steps: range, number: int, finished: bool) -> None:
    writer = MetricsWriter(run_dir, start_step, tree)
    for row in rows(steps, number):
        writer.write(row)
    writer.close(finished)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A file tracking store (MLflow keeps it in maintenance mode behind MLFLOW_ALLOW_FILE_STORE) with an
    experiment whose artifacts go to a temporary folder."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    MlflowClient(uri).create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def test_mlflow_gets_config_rows_tags_and_continues_its_run(mlflow_store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    tree = to_dict(resolve({}, ["run.trackers=[mlflow]", "parallel.dp=2", "run.name=tracked"]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    attempt(run_dir, tree, 0, range(0, 6), 1, finished=False)  # the group dies after step 5
    run_id = read_record(run_dir, "mlflow")["run_id"]
    attempt(run_dir, tree, 3, range(3, 9), 2, finished=True)  # resumed from the step-3 checkpoint
    assert read_record(run_dir, "mlflow")["run_id"] == run_id  # the same MLflow run, continued

    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == flatten(tree)
    assert run.data.tags["raylm.layout"] == "pp=1 tp=1 dp=2 zero=0"
    assert run.data.tags["raylm.version"]
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(9))  # each step once
    by_step = {m.step: m.value for m in history}
    # steps 3..5 were held from the first attempt; the resumed attempt adds 6..8
    assert by_step[5] == pytest.approx(rows(range(5, 6), 1)[0]["loss"])
    assert by_step[8] == pytest.approx(rows(range(8, 9), 2)[0]["loss"])
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [7]
    assert {m.key for m in history} == {"loss"} and "diverged" in run.data.metrics
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(9))
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]


def test_rows_a_tracker_lacks_are_sent_from_metrics_jsonl_at_a_restart(mlflow_store, tmp_path, monkeypatch):
    """Rows still queued when a SIGKILL ended rank 0 never reached the server: as for a tracker added on resume,
    the restart sends the rows metrics.jsonl kept (the steps before the checkpoint) that the run lacks."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    attempt(tmp_path, to_dict(resolve({}, ["run.trackers=[]"])), 0, range(0, 6), 1, finished=False)
    attempt(tmp_path, to_dict(resolve({}, ["run.trackers=[mlflow]"])), 4, range(4, 8), 2, finished=True)
    history = MlflowClient(mlflow_store).get_metric_history(read_record(tmp_path, "mlflow")["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(8))


def test_unreachable_mlflow_warns_once_and_the_rows_still_land(tmp_path, monkeypatch, warnings_seen):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tree = to_dict(resolve({}, ["run.trackers=[tensorboard, mlflow]"]))
    started = time.perf_counter()
    attempt(tmp_path, tree, 0, range(0, 20), 1, finished=True)
    assert time.perf_counter() - started < 20
    warned = [r.getMessage() for r in warnings_seen.records if "run.trackers: mlflow" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "MLFLOW_TRACKING_URI" in warned[0]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(20))
    assert list((tmp_path / "tensorboard").iterdir())
    assert not read_record(tmp_path, "mlflow")  # no run was created


def wandb_records(folder):
    """Every record of the offline W&B runs under `folder`: the .wandb files are LevelDB-style logs (32 KiB blocks
    of checksummed chunks after a 7-byte header) of wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    for path in sorted(folder.rglob("run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block  # a block's tail too short for a chunk header is padding
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if pos + 7 + length > len(data):
                break  # a chunk wandb's core process is still writing
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                yield record


def finished_records(folder, runs: int, timeout_s: float = 30.0) -> list:
    """The records once `runs` offline runs end with their exit record (wandb's core process may still be writing
    them for a moment after finish() returned)."""
    deadline = time.monotonic() + timeout_s
    from google.protobuf.message import DecodeError

    while True:
        try:
            records = list(wandb_records(folder))
        except DecodeError:  # a record caught half written: read the files again
            if time.monotonic() > deadline:
                raise
            records = []
        exits = sum(r.WhichOneof("record_type") == "exit" for r in records)
        if exits >= runs or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_gets_every_step_once_across_a_restart(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_PROJECT", "raylm-tests")
    (tmp_path / "wandb-files").mkdir()
    (tmp_path / "run").mkdir()
    tree = to_dict(resolve({}, ["run.trackers=[wandb]", "parallel.pp=2", "run.name=offline"]))
    attempt(tmp_path / "run", tree, 0, range(0, 6), 1, finished=False)
    attempt(tmp_path / "run", tree, 3, range(3, 9), 2, finished=True)
    run_id = read_record(tmp_path / "run", "wandb")["run_id"]

    records = finished_records(tmp_path / "wandb-files", runs=2)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {run_id} and {r.display_name for r in runs} == {"offline"}
    assert any("raylm.layout=pp=2 tp=1 dp=1 zero=0" in r.tags for r in runs)
    steps = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            step = record.history.step.num
            steps.append(step)
            (sent,) = rows(range(step, step + 1), 1 if step <= 5 else 2)  # 3..5 from the first attempt
            assert float(items["loss"]) == pytest.approx(sent["loss"])
    assert steps == list(range(9))  # each step once, in order


def test_a_sweep_is_a_parent_run_with_a_child_per_trial(mlflow_store, tmp_path, monkeypatch):
    """The sweep's side (parent run, outputs, each trial's values and decisions) and each trial's rank 0 (its run
    nested under the parent), as `raylm sweep` calls them; the Tune trials themselves are left out."""
    import json

    from mlflow import MlflowClient

    from raylm.config import with_overrides
    from raylm.train.tracking.mlflow_run import PARENT_TAG
    from raylm.tune.tracking import log_sweep, open_sweep_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    sweep_dir = tmp_path / "lr-sweep"
    sweep_dir.mkdir()
    base = resolve({}, ["run.trackers=[mlflow]", "tune.name=lr-sweep"])
    cfg = open_sweep_run(base, sweep_dir, {"optim.lr": {"grid": [0.01, 0.001]}})
    parent = cfg.tune.parent_run
    assert parent and open_sweep_run(base, sweep_dir, {}).tune.parent_run == parent  # --resume: the same run
    trials, decisions = [], []
    outcomes = (("a_00000", 0.01, "continue", "finished"), ("a_00001", 0.001, "stop", "stopped"))
    for trial_id, lr, action, status in outcomes:
        trial = with_overrides(cfg, {"optim.lr": lr, "tune.trial_of": "lr-sweep", "run.name": trial_id})
        folder = sweep_dir / "trials" / trial_id
        folder.mkdir(parents=True)
        attempt(folder, to_dict(trial), 0, range(0, 4), 1, finished=False)
        with (folder / "metrics.jsonl").open("a") as lost:  # rows a killed worker never sent
            lost.write("".join(json.dumps(row) + "\n" for row in rows(range(4, 6), 1)))
        trials.append(
            {"trial_id": trial_id, "folder": str(folder), "params": {"optim.lr": lr}, "status": status}
        )
        decisions.append(
            {"trial": trial_id, "rung": 0, "milestone_tokens": 128, "value": 4.0, "action": action}
        )
    (sweep_dir / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    (sweep_dir / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    log_sweep(cfg, sweep_dir)

    client = MlflowClient(mlflow_store)
    assert client.get_run(parent).data.params["tune.name"] == "lr-sweep"
    assert {a.path for a in client.list_artifacts(parent)} == {
        "space.json",
        "trials.jsonl",
        "decisions.jsonl",
    }
    for trial, decision in zip(trials, decisions, strict=True):
        child = client.get_run(read_record(Path(trial["folder"]), "mlflow")["run_id"])
        assert child.data.tags[PARENT_TAG] == parent and child.info.run_name == trial["trial_id"]
        assert json.loads(child.data.tags["raylm.values"]) == trial["params"]
        assert child.data.params["optim.lr"] == str(trial["params"]["optim.lr"])
        assert json.loads(child.data.tags["raylm.rung0"])["action"] == decision["action"]
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss")) == list(range(6))
        assert child.info.status == {"finished": "FINISHED", "stopped": "KILLED"}[trial["status"]]
