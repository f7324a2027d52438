"""A real 6-trial ASHA sweep on a local Ray: equal-token rungs, fixed validation samples, outputs, nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylm.cli import main as raylm_main
from raylm.config import to_dict
from raylm.train.metrics import read_metrics
from raylm.tune.sweep import sweep
from tests.conftest import REPO_ROOT
from tests.ray.stop_watch import StopWatch

SEQ = 32  # the small model's data.seq_len
# 3 lrs x 2 batches: four lrs far too small to learn in the budget, so ASHA has trials to stop at its rungs.
SPACE = "optim.lr: {grid: [1.0e-2, 1.0e-4, 1.0e-5]}\ntrain.global_batch: {grid: [8, 16]}\n"
BUDGET = 9 * 2048  # rungs at 2048 and 6144 tokens: steps 8 and 24 at batch 8, 4 and 12 at batch 16


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_asha_sweep_at_equal_tokens(ray_cluster, small_config, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    cfg = small_config(
        "unused",
        "tune.name=asha",
        "tune.num_samples=1",
        f"tune.budget_tokens={BUDGET}",
        "train.eval_samples=16",
    )
    watch = StopWatch(Path(cfg.run.dir) / "asha")
    watch.start()
    try:
        summary = sweep(cfg, space)
    finally:
        watch.finish()
    sweep_dir = Path(summary["sweep_dir"])
    trials = read_jsonl(sweep_dir / "trials.jsonl")
    assert len(trials) == 6 and summary["status"]["stopped"] >= 2, summary
    assert {t["status"] for t in trials} <= {"finished", "stopped"}
    for t in trials:
        if t["status"] == "finished":
            batch_tokens = t["params"]["train.global_batch"] * SEQ
            assert BUDGET <= t["tokens"] < BUDGET + batch_tokens
    assert_rungs_at_equal_tokens(sweep_dir, trials)
    assert_promoted_after_a_pause_resumed_at_the_rung(sweep_dir, trials)
    assert_same_validation_samples(trials)
    for name in ("decisions.jsonl", "best.yaml", "sweep.png", "sweep.md"):
        assert (sweep_dir / name).stat().st_size > 0
    assert_nothing_left(ray_cluster)
    assert_stopped_trials_left_nothing(watch, trials)
    assert (
        raylm_main(["train", str(sweep_dir / "best.yaml"), "train.max_steps=2", "run.name=best-check"]) == 0
    )


def assert_rungs_at_equal_tokens(sweep_dir: Path, trials: list[dict]):
    """Every decision lies in [M_k, M_k + one step of that trial], and so do the final tokens of a stopped trial."""
    batch_of = {t["trial_id"]: t["params"]["train.global_batch"] for t in trials}
    decisions = read_jsonl(sweep_dir / "decisions.jsonl")
    assert decisions and {d["milestone_tokens"] for d in decisions} <= {2048, 6144}
    for d in decisions:
        assert d["milestone_tokens"] <= d["tokens"] < d["milestone_tokens"] + batch_of[d["trial"]] * SEQ, d
    stops = {d["trial"]: d for d in decisions if d["action"] == "stop"}
    assert set(stops) == {t["trial_id"] for t in trials if t["status"] == "stopped"}
    for t in trials:  # a stopped trial waited at its rung for the decision: it trained no step past it
        if t["trial_id"] in stops:
            stop = stops[t["trial_id"]]
            assert t["tokens"] <= stop["milestone_tokens"] + batch_of[t["trial_id"]] * SEQ, (
                t["tokens"],
                stop,
            )


def assert_promoted_after_a_pause_resumed_at_the_rung(sweep_dir: Path, trials: list[dict]):
    """Rung 1 sees at most two trials, and the first cannot be promoted on arrival: it paused. Each trial promoted
    after it paused restarted from the checkpoint it committed at that rung."""
    by_id = {t["trial_id"]: t for t in trials}
    decisions = read_jsonl(sweep_dir / "decisions.jsonl")
    assert any(d["rung"] == 1 and d["action"] == "pause" for d in decisions), decisions
    for d in (d for d in decisions if d["action"] == "continue" and d["event"] != "report"):
        trial = by_id[d["trial"]]
        rung_step = d["tokens"] // (trial["params"]["train.global_batch"] * SEQ)
        assert rung_step in [
            r["resumed_from"] for r in read_metrics(Path(trial["folder"])) if "resumed_from" in r
        ]
        assert trial["status"] == "finished" or d["rung"] == 0, trial


def assert_same_validation_samples(trials: list[dict]):
    counts = {
        (t["params"]["train.global_batch"], r["val_samples"])
        for t in trials
        for r in read_metrics(Path(t["folder"]))
        if "val_samples" in r
    }
    assert {batch for batch, _ in counts} == {8, 16} and len({n for _, n in counts}) == 1, counts


def assert_stopped_trials_left_nothing(watch: StopWatch, trials: list[dict]):
    """Within 30 s of each stop: no placement group, Train actor or Ray Data task of that trial alive; a trial
    trained in its Tune actor (one worker: raylm.tune.trial_actor, no Train actors) writes no step after it."""
    stopped = {t["trial_id"] for t in trials if t["status"] == "stopped"}
    assert not watch.late, f"left 30 s after a stop: {watch.late}"
    assert set(watch.checked) == stopped, (watch.checked, stopped)
    assert not set(watch.owned) & stopped, (
        watch.owned
    )  # one-worker trials start no Train controller or worker
    assert watch.quiet_since.keys() == stopped, (
        watch.quiet_since,
        stopped,
    )  # each was watched after its stop


def assert_nothing_left(ray, timeout_s: float = 30.0):
    """No placement group, Train controller or worker of any trial outlives the sweep by more than 30 s."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout_s
    while True:
        groups = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        actors = [
            a.class_name
            for a in list_actors(filters=[("state", "=", "ALIVE")])
            if "Train" in a.class_name or "Worker" in a.class_name or "SplitCoordinator" in a.class_name
        ]
        if (not groups and not actors) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not groups and not actors, f"left after the sweep: {groups} {actors}"


@pytest.mark.slow
def test_a_killed_trial_worker_resumes_from_its_rung_checkpoint(ray_cluster, small_config, tmp_path):
    """fault.drill SIGKILLs the trial's worker after step 10; Ray Train restarts it from the rung-0 checkpoint
    (step 8 at batch 8) and the trial still trains its budget. fault.max_failures keeps this one-worker trial on a
    nested TorchTrainer (raylm.tune.trial_actor)."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-2]}\n")
    cfg = small_config(
        "unused",
        "tune.name=kill",
        "tune.num_samples=1",
        f"tune.budget_tokens={BUDGET}",
        "train.eval_batches=2",
        "fault.drill=step@10",
        "fault.max_failures=1",
        "tune.max_failures=1",
    )
    sweep_dir = Path(sweep(cfg, space)["sweep_dir"])
    (trial,) = read_jsonl(sweep_dir / "trials.jsonl")
    rows = read_metrics(Path(trial["folder"]))
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] == [8]
    assert trial["status"] == "finished" and BUDGET <= trial["tokens"] < BUDGET + 8 * SEQ
    assert [r["step"] for r in rows] == list(range(len(rows)))  # each step once


@pytest.mark.slow
def test_an_interrupted_sweep_resumes(ray_cluster, small_config, tmp_path):
    """SIGINT `raylm sweep` after its first stop, then --resume: finished trials are not rerun, stopped trials stay
    stopped, and the sweep ends with num_samples trials."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-2, 1.0e-5, 2.0e-5, 1.0e-2]}\n")
    cfg = small_config(
        "unused",
        "tune.name=resume",
        "tune.num_samples=1",
        f"tune.budget_tokens={BUDGET}",
        "train.eval_batches=2",
        "tune.max_concurrent=2",
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    sweep_dir = Path(cfg.run.dir) / "resume"
    command = [sys.executable, "-m", "raylm.cli", "sweep", str(config_file), str(space)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    first = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
    stopped_at_interrupt = wait_for_first_stop(sweep_dir / "decisions.jsonl")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 0
    before = {p.parent.name: p.read_text() for p in (sweep_dir / "trials").glob("*/metrics.jsonl")}
    finished_before = {
        t["trial_id"] for t in read_jsonl(sweep_dir / "trials.jsonl") if t["status"] == "finished"
    }
    assert subprocess.run(command + ["--resume"], env=env, cwd=REPO_ROOT, timeout=600).returncode == 0
    trials = read_jsonl(sweep_dir / "trials.jsonl")
    assert len(trials) == 4 and all(t["status"] in ("finished", "stopped") for t in trials)
    status = {t["trial_id"]: t["status"] for t in trials}
    assert all(status[trial] == "stopped" for trial in stopped_at_interrupt)
    for trial in finished_before:
        assert (sweep_dir / "trials" / trial / "metrics.jsonl").read_text() == before[trial]


def wait_for_first_stop(decisions: Path, timeout_s: float = 300) -> set[str]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stops = (
            {d["trial"] for d in read_jsonl(decisions) if d["action"] == "stop"}
            if decisions.exists()
            else set()
        )
        if stops:
            return stops
        time.sleep(0.2)
    raise AssertionError("no trial was stopped")


@pytest.mark.slow
def test_pbt_exploits_a_donor_checkpoint(ray_cluster, small_config, tmp_path):
    """4 trials, three of them with lrs far too small: at a rung the worst takes the best one's checkpoint."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-2, 1.0e-5, 2.0e-5, 3.0e-5]}\n")
    cfg = small_config(
        "unused",
        "tune.name=pbt",
        "tune.num_samples=1",
        f"tune.budget_tokens={BUDGET}",
        "train.eval_batches=2",
        "tune.scheduler=pbt",
    )
    summary = sweep(cfg, space)
    sweep_dir = Path(summary["sweep_dir"])
    exploits = [d for d in read_jsonl(sweep_dir / "decisions.jsonl") if d["action"] == "exploit"]
    assert exploits
    first = exploits[0]
    rows = read_metrics(sweep_dir / "trials" / first["trial"])
    resumed = [r for r in rows if "resumed_from_checkpoint" in r]
    assert resumed and f"from-{first['donor']}" in resumed[0]["resumed_from_checkpoint"]
    assert resumed[0]["tokens"] > first["tokens"]  # it continued from the donor's rung, not from scratch
    path = read_jsonl(sweep_dir / "best_lr_path.jsonl")
    assert path and path[-1]["tokens"] >= BUDGET


@pytest.mark.slow
def test_optuna_search_under_asha_one_trial_at_a_time(ray_cluster, small_config, tmp_path):
    """Optuna behind Tune's ConcurrencyLimiter, one trial at a time: the first trial pauses at rung 0, and the sweep
    goes on only because raylm raises the limit by its paused trials; one of three trials trains the budget."""
    pytest.importorskip("optuna")
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    cfg = small_config(
        "unused",
        "tune.name=optuna",
        "tune.num_samples=3",
        "tune.budget_tokens=4608",
        "train.eval_batches=2",
        "tune.search=optuna",
        "tune.scheduler=asha",
        "tune.max_concurrent=1",
    )
    summary = sweep(cfg, space)
    sweep_dir = Path(summary["sweep_dir"])
    trials = read_jsonl(sweep_dir / "trials.jsonl")
    assert sorted(t["status"] for t in trials) == ["finished", "stopped", "stopped"], trials
    assert all(1e-3 <= t["params"]["optim.lr"] <= 1e-2 for t in trials)
    first = read_jsonl(sweep_dir / "decisions.jsonl")[0]
    assert (first["rung"], first["action"]) == (0, "pause"), first


# slow: a second sweep (~40 s); make test keeps the ASHA sweep, and a diverged trial's stop and rank in
# tests/unit/test_sweep_asha.py
@pytest.mark.slow
def test_a_diverged_trial_ends_at_once_and_is_never_best(ray_cluster, small_config, tmp_path):
    """lr 1e30 overflows the weights after one step: that trial ends as `diverged`, with no NaN in any JSON."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-2, 1.0e+30]}\n")
    cfg = small_config(
        "unused",
        "tune.name=nan",
        "tune.num_samples=1",
        "tune.budget_tokens=4608",
        "train.eval_batches=2",
        "train.grad_clip=0",
        "tune.scheduler=fifo",
    )
    summary = sweep(cfg, space)
    sweep_dir = Path(summary["sweep_dir"])
    trials = {t["params"]["optim.lr"]: t for t in read_jsonl(sweep_dir / "trials.jsonl")}
    diverged = trials[1e30]
    assert diverged["status"] == "diverged" and diverged["last"] is None and diverged["tokens"] < 4608
    assert summary["best"]["params"]["optim.lr"] == 1e-2
    for name in ("trials.jsonl", "decisions.jsonl", f"trials/{diverged['trial_id']}/metrics.jsonl"):
        text = (sweep_dir / name).read_text()
        assert "NaN" not in text and "Infinity" not in text, name
