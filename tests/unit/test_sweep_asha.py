"""ASHA on tokens: the rung book's decisions from a table, its replay after a restore, divergence is never best."""

import math

from raylm.tune.asha import RungBook
from raylm.tune.results import TrialRecord, finite, pick_best


def test_asha_keeps_the_best_third_at_each_rung():
    book = RungBook([100, 300], reduction_factor=3)
    assert book.decide("a", 99, 5.0) is None  # below the first rung
    first = book.decide("a", 120, 5.0)
    assert (first.rung, first.milestone_tokens, first.tokens, first.cutoff, first.action) == (0, 100, 120, None,
                                                                                              "continue")
    assert book.decide("a", 130, 4.0) is None  # judged once per rung
    assert book.decide("b", 100, 4.0).action == "continue"  # 4.0 < cutoff 4.33
    stop = book.decide("c", 110, 6.0)
    assert stop.action == "stop" and stop.cutoff == 4.0 + (5.0 - 4.0) / 3
    assert book.decide("b", 300, 3.0).rung == 1


def test_a_diverged_value_is_stopped_and_written_as_null():
    book = RungBook([100], reduction_factor=3)
    book.decide("a", 100, 3.0)
    decision = book.decide("b", 100, math.inf)
    assert decision.action == "stop" and decision.value is None
    assert finite(math.nan) is None and finite(2.0) == 2.0


def test_replay_rebuilds_the_records():
    book = RungBook([100, 300], reduction_factor=3)
    rows = [vars(book.decide(t, 100, v)) for t, v in (("a", 3.0), ("b", 4.0), ("c", 5.0))]
    again = RungBook([100, 300], reduction_factor=3)
    again.replay(rows)
    assert again.recorded == book.recorded
    assert again.decide("d", 100, 4.5).action == book.decide("d", 100, 4.5).action == "stop"


def test_fifo_records_but_never_stops():
    book = RungBook([100], reduction_factor=3, stops=False)
    book.decide("a", 100, 1.0)
    assert book.decide("b", 100, 9.0).action == "record"


def record(name, status, last):
    return TrialRecord(name=name, trial_id=name, folder="", params={}, status=status, tokens=1, steps=1, last=last,
                       best=last, rungs={}, wall_s=0.0)


def test_best_is_never_diverged_stopped_or_failed():
    records = [record("d", "diverged", None), record("s", "stopped", 1.0), record("e", "error", None),
               record("f", "finished", 3.0), record("g", "finished", 2.5)]
    assert pick_best(records).name == "g"
