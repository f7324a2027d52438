"""PBT at token rungs from a table: who exploits whom, the perturbed lr, and the learned lr path across exploits."""

import pytest

from raylm.tune.pbt import EXPLOIT_KEY, PbtBook, lr_path, split_exploit


def test_the_worst_quantile_takes_the_best_trials_checkpoint():
    book = PbtBook([100, 300], quantile=0.25, seed=1)
    assert book.decide("a", 100, 3.0, "/a/step-4", {"optim.lr": 1e-2}) == []  # alone at the rung
    assert book.decide("b", 100, 2.0, "/b/step-4", {"optim.lr": 2e-2}) == []  # a is worse but no longer running
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
    assert book.decide("other", 100, 5.5, "/o", {}, alive={"slow"}) == []  # slow already exploited at this rung


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
    rows_of = {"a": rows(1.0, [10, 20, 30, 40]), "b": rows(2.0, [10, 20]) + rows(2.5, [30, 40]),
               "c": rows(3.0, [10, 20, 30]) + rows(3.5, [40])}
    exploits = [{"trial": "b", "donor": "a", "tokens": 20}, {"trial": "c", "donor": "b", "tokens": 30}]
    assert lr_path("a", rows_of, exploits) == rows(1.0, [10, 20, 30, 40])
    assert lr_path("b", rows_of, exploits) == rows(1.0, [10, 20]) + rows(2.5, [30, 40])
    assert lr_path("c", rows_of, exploits) == rows(1.0, [10, 20]) + rows(2.5, [30]) + rows(3.5, [40])
