"""Every bad search space is one line naming the value and the fix, before Ray starts (exit 2)."""

import subprocess
import sys

import pytest

from raylm.config import resolve
from raylm.errors import ConfigError
from raylm.tune.plan import check_combinations, plan_sweep
from raylm.tune.space import active_params, load_space
from tests.conftest import REPO_ROOT

BASE = [
    "data.seq_len=128",
    "train.max_steps=60",
    "train.global_batch=16",
    "parallel.micro_batch=4",
    "train.eval_batches=4",
]


def check(tmp_path, text, *overrides):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    cfg = resolve({}, BASE + list(overrides))
    space = load_space(space_file)
    return check_combinations(cfg, space, plan_sweep(cfg, space))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "optim.learning_rate: {choice: [1.0e-3]}\n",
            r"'optim.learning_rate' is not a config key; did you mean optim.lr\?",
        ),
        (
            "optim.lr: {normal: [0, 1]}\n",
            r"optim.lr: \{'normal': \[0, 1\]\} is not one distribution; use one of choice",
        ),
        ("optim.lr: {uniform: [0.1, 0.01]}\n", r"optim.lr: uniform: low 0.1 must be below high 0.01"),
        ("optim.lr: {uniform: [0.01, 0.01]}\n", r"low 0.01 must be below high 0.01"),
        ("optim.lr: {uniform: [small, 0.01]}\n", r"optim.lr: uniform: bound 'small' is not a number"),
        ("optim.lr: {loguniform: [0, 0.01]}\n", r"low 0.0 must be > 0 for a log scale"),
        ("optim.lr: {choice: []}\n", r"optim.lr: choice takes a non-empty list of values; got \[\]"),
        ("train.global_batch: {randint: [8, 16.5]}\n", r"bound 16.5 is not an integer"),
        ("run.seed: {choice: [1, 2]}\n", r"run.seed is set by the sweep itself"),
        ("checkpoint.resume: {choice: [auto]}\n", r"checkpoint.resume is set by the sweep itself"),
        ("tune.num_samples: {choice: [1]}\n", r"tune.num_samples is set by the sweep itself"),
        (
            "train.global_batch: {choice: [8, 7]}\n",
            r"value train.global_batch=7 fails: train.global_batch=7 is not divisible",
        ),
        (
            "train.global_batch: {grid: [8, 16]}\nschedule.batch.start: {choice: [8, 16]}\n",
            r"combination train.global_batch=8, schedule.batch.start=16 fails: schedule.batch.start=16 exceeds",
        ),
        (
            "parallel.micro_batch: {choice: [4, 3]}\n",
            r"value parallel.micro_batch=3 fails: train.global_batch=16 is not divisible",
        ),
        (
            "schedule.lr.decay_frac: {uniform: [0.1, 0.3], when: {schedule.lr.kind: wsd}}\n",
            r"`when` names schedule.lr.kind, which the space does not search",
        ),
    ],
)
def test_bad_space(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        check(tmp_path, text)


def test_validation_samples_that_a_trial_cannot_split(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"value parallel.micro_batch=8 fails: train.eval_samples=36 is not "
        r"divisible by parallel.micro_batch \* dp = 8 \* 1 = 8",
    ):
        check(tmp_path, "parallel.micro_batch: {choice: [4, 8]}\n", "train.eval_samples=36")


def test_the_old_eval_samples_key_names_the_new_one():
    with pytest.raises(ConfigError, match=r"^tune.eval_samples is now train.eval_samples; rename the key$"):
        resolve({}, BASE + ["tune.eval_samples=64"])
    with pytest.raises(ConfigError, match=r"^tune.eval_samples is now train.eval_samples"):
        resolve({"tune": {"eval_samples": 64}})


def test_budget_below_grace(tmp_path):
    with pytest.raises(
        ConfigError, match="budget of 1000 tokens is not above its grace period of 5000 tokens"
    ):
        check(tmp_path, "optim.lr: {choice: [1.0e-3]}\n", "tune.budget_tokens=1000", "tune.grace_tokens=5000")


def test_a_good_space_checks_every_combination(tmp_path):
    text = (
        "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\ntrain.global_batch: {grid: [8, 16]}\n"
        "schedule.lr.kind: {choice: [cosine, wsd, linear]}\n"
        "schedule.lr.decay_frac: {uniform: [0.1, 0.3], when: {schedule.lr.kind: wsd}}\n"
    )
    assert check(tmp_path, text) == 2 * 2 * 3 * 2


def test_conditional_keys_apply_only_when_their_condition_holds():
    raw = {
        "schedule.lr.kind": {"choice": ["wsd", "cosine"]},
        "schedule.lr.decay_frac": {"uniform": [0.1, 0.3], "when": {"schedule.lr.kind": "wsd"}},
    }
    assert active_params(raw, {"schedule.lr.kind": "cosine", "schedule.lr.decay_frac": 0.2}) == {
        "schedule.lr.kind": "cosine"
    }
    assert len(active_params(raw, {"schedule.lr.kind": "wsd", "schedule.lr.decay_frac": 0.2})) == 2


@pytest.mark.parametrize("space", sorted((REPO_ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate_on_the_tiny_config(space):
    from raylm.config import load_config

    cfg = load_config(REPO_ROOT / "jobs/configs/tiny.yaml", ["parallel.pp=1", "train.max_steps=60"])
    loaded = load_space(space)
    assert check_combinations(cfg, loaded, plan_sweep(cfg, loaded)) >= 1


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", "sweep", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_bad_space_is_one_line_exit_2(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {uniform: [a, 0.01]}\n")
    done = run_cli("jobs/configs/tiny.yaml", str(space), f"run.dir={tmp_path}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a number" in done.stderr


def test_cli_resume_without_a_sweep_exit_2(tmp_path):
    done = run_cli("jobs/configs/tiny.yaml", "tune_spaces/lr_batch.yaml", f"run.dir={tmp_path}", "--resume")
    assert done.returncode == 2 and "--resume: no sweep to resume in" in done.stderr


def test_optuna_missing_names_the_extra(monkeypatch, tmp_path):
    from raylm.tune.sweep import _check_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    space_file = tmp_path / "space.yaml"
    space_file.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    with pytest.raises(ConfigError, match=r"tune.search=optuna needs Optuna: pip install 'raylm\[optuna\]'"):
        _check_optuna(load_space(space_file))


def test_resume_refuses_a_changed_config_or_space(tmp_path):
    import json

    from raylm.config import to_dict
    from raylm.tune.resume import SWEEP_FILE, check_resumable

    space_file = tmp_path / "space.yaml"
    space_file.write_text("optim.lr: {choice: [1.0e-3, 1.0e-2]}\n")
    cfg = resolve({}, BASE)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "tuner.pkl").write_text("")
    (sweep_dir / SWEEP_FILE).write_text(
        json.dumps({"config": to_dict(cfg), "space": load_space(space_file).raw})
    )
    check_resumable(sweep_dir, cfg, load_space(space_file))
    with pytest.raises(ConfigError, match=r"the config differs .* at optim.lr \(0.003 then, 0.01 now\)"):
        check_resumable(sweep_dir, resolve({}, BASE + ["optim.lr=0.01"]), load_space(space_file))
    space_file.write_text("optim.lr: {choice: [1.0e-3]}\n")
    with pytest.raises(ConfigError, match=r"the space differs .* at optim.lr"):
        check_resumable(sweep_dir, cfg, load_space(space_file))


@pytest.mark.parametrize(
    "cluster, requested, message",
    [
        (
            {"CPU": 2.0},
            3,
            r"tune.max_concurrent=3 cannot fit: each trial needs 1 CPU\(s\) .* 2 CPUs, which fits 2",
        ),
        ({"CPU": 8.0, "GPU": 2.0}, 2, r"each trial needs 2 GPU\(s\) .* 2 GPUs, which fits 1"),
    ],
)
def test_max_concurrent_that_cannot_fit(cluster, requested, message):
    from raylm.tune.resources import trial_share

    world = "parallel.dp=2" if "GPU" in cluster else "parallel.dp=1"
    cfg = resolve({}, BASE + [world, f"tune.max_concurrent={requested}"])
    with pytest.raises(ConfigError, match=message):
        trial_share(cfg, cluster, trials=6)


def test_automatic_concurrency_sizes_workers_from_a_trials_share():
    from raylm.tune.resources import trial_share

    share = trial_share(resolve({}, BASE), {"CPU": 2.0}, trials=6)
    assert (share.concurrent, share.cpus_per_worker, share.torch_threads) == (2, 0.45, 1)
    assert trial_share(resolve({}, BASE), {"CPU": 2.0}, trials=1).concurrent == 1
    gpu = trial_share(resolve({}, BASE + ["parallel.dp=2"]), {"CPU": 16.0, "GPU": 8.0}, trials=6)
    assert (gpu.concurrent, gpu.use_gpu) == (4, True)
