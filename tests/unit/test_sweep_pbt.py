"""PBT at token rungs from a table: who exploits whom, the perturbed lr, and the learned lr path across exploits."""

from pathlib import Path

import pytest

from raylm.config import resolve, with_overrides
from raylm.tune.budget import tokens_after_steps
from raylm.tune.pbt import EXPLOIT_KEY, PbtBook, lr_path, split_exploit
from raylm.tune.plan import best_config, plan_sweep, trial_config
from raylm.tune.space import Space


def test_the_worst_quantile_takes_the_best_trials_checkpoint():
    book = PbtBook([100, 300], quantile=0.25, seed=1)
    assert book.decide("a", 100, 3.0, "/a/step-4", {"optim.lr": 1e-2}) == []  # alone at the rung
    assert (
        book.decide("b", 100, 2.0, "/b/step-4", {"optim.lr": 2e-2}) == []
    )  # a is worse but no longer running
    (exploit,) = book.decide("c", 110, 9.0, "/c/step-4", {"optim.lr": 1e-5})
    assert exploit["trial"] == "c" and exploit["donor"] == "b" and exploit["checkpoint"] == "/b/step-4"
    assert exploit["rung"] == 0 and exploit["tokens"] == 100
    assert exploit["config"]["optim.lr"] in (pytest.approx(2e-2 * 0.8), pytest.approx(2e-2 * 1.25))
    assert book.decide("c", 120, 9.0, "/c/step-4", {}) == []  # judged once per rung


def test_a_trial_that_arrived_first_is_exploited_when_a_better_one_arrives():
    book = PbtBook([100], quantile=0.25)
    book.decide("slow", 100, 6.0, "/s", {"optim.lr": 1e-5})
    (exploit,) = book.decide("good", 100, 5.0, "/g", {"optim.lr": 1e-2}, alive={"slow"})
    assert exploit["trial"] == "slow" and exploit["donor"] == "good"
    assert (
        book.decide("other", 100, 5.5, "/o", {}, alive={"slow"}) == []
    )  # slow already exploited at this rung


def test_no_exploit_without_a_better_checkpoint():
    book = PbtBook([100])
    book.decide("a", 100, 3.0, None, {"optim.lr": 1.0})
    assert book.decide("b", 100, 4.0, None, {"optim.lr": 1.0}) == []


def test_split_exploit():
    params, exploit = split_exploit({"optim.lr": 1.0, EXPLOIT_KEY: {"n": 1}})
    assert params == {"optim.lr": 1.0} and exploit == {"n": 1}


def rows(lr, tokens):
    return [{"tokens": t, "lr": lr} for t in tokens]


def test_lr_path_follows_the_donors():
    rows_of = {
        "a": rows(1.0, [10, 20, 30, 40]),
        "b": rows(2.0, [10, 20]) + rows(2.5, [30, 40]),
        "c": rows(3.0, [10, 20, 30]) + rows(3.5, [40]),
    }
    exploits = [{"trial": "b", "donor": "a", "tokens": 20}, {"trial": "c", "donor": "b", "tokens": 30}]
    assert lr_path("a", rows_of, exploits) == rows(1.0, [10, 20, 30, 40])
    assert lr_path("b", rows_of, exploits) == rows(1.0, [10, 20]) + rows(2.5, [30, 40])
    assert lr_path("c", rows_of, exploits) == rows(1.0, [10, 20]) + rows(2.5, [30]) + rows(3.5, [40])


def test_an_exploit_moves_searched_batch_keys_to_a_neighbouring_value():
    space = {
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "train.global_batch": {"choice": [8, 16, 32]},
        "schedule.batch.ramp_tokens": {"randint": [1000, 5000]},
    }
    moved = set()
    for seed in range(8):
        book = PbtBook([100], seed=seed, space=space)
        config = book.perturb(
            {
                "optim.lr": 1e-3,
                "train.global_batch": 16,
                "schedule.batch.ramp_tokens": 4800,
                "model.n_layer": 2,
            }
        )
        assert config["train.global_batch"] in (8, 32) and config["model.n_layer"] == 2
        assert config["schedule.batch.ramp_tokens"] in (
            3840,
            4999,
        )  # x0.8, or x1.25 kept below the range's end
        moved.add(config["train.global_batch"])
    assert moved == {8, 32}
    ends = PbtBook([100], space=space)
    assert (
        ends.perturb({"train.global_batch": 32})["train.global_batch"] == 16
    )  # the only neighbour of the end
    assert PbtBook([100]).perturb({"train.global_batch": 32}) == {"train.global_batch": 32}  # not searched


def test_after_an_exploit_the_budget_counts_the_donors_tokens_then_the_new_batch():
    """A trial that takes a batch-8 donor's checkpoint at step 20 (5120 tokens) with batch 16 trains 16-sample
    steps from there: the budget of 15360 tokens ends at step 20 + 20, not at the 30 steps of a batch-16 run."""
    cfg = resolve(
        {}, ["data.seq_len=32", "train.max_steps=60", "train.global_batch=8", "parallel.micro_batch=4"]
    )
    plan = plan_sweep(cfg, Space(path="s", raw={}, params=[]))
    start = (20, tokens_after_steps(20, 8, cfg.schedule.batch, 32))
    trial = trial_config(cfg, {"train.global_batch": 16}, plan, "/tmp/trials", "t", start=start)
    assert plan.budget_tokens == 15360 and trial.train.max_steps == 20 + 20
    assert trial_config(cfg, {"train.global_batch": 16}, plan, "/tmp/trials", "t").train.max_steps == 30
    exploited = with_overrides(trial, {"tune.start_from": "/tmp/exploits/t-1-from-d"})
    best = best_config(exploited, cfg)  # best.yaml trains that config from scratch: 30 steps of 16, no donor
    assert best.train.max_steps == 30 and best.tune.start_from == ""


def test_the_copied_donor_checkpoint_gives_the_position_the_budget_starts_from(tmp_path):
    import json

    from raylm.tune.sweep import checkpoint_position, take_donor_checkpoint

    donor = tmp_path / "trials" / "d" / "checkpoints" / "step-00000020"
    donor.mkdir(parents=True)
    (donor / "trainer_state.json").write_text(json.dumps({"step": 20, "tokens": 5120, "samples": 160}))
    run_dir = tmp_path / "trials" / "t"
    (run_dir / "checkpoints" / "step-00000008").mkdir(parents=True)
    folder = take_donor_checkpoint(run_dir, {"checkpoint": str(donor), "n": 1, "donor": "d"}, "t")
    assert checkpoint_position(Path(folder)) == (20, 5120)
    assert not (run_dir / "checkpoints").exists()  # the trial's own checkpoints go: it resumes from the copy
