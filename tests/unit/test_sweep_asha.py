"""ASHA on tokens: the rung book's decisions from a table, its records rebuilt from the trials' rung rows after a
restore, divergence is never best."""

import json
import math
from pathlib import Path

import numpy as np

from raylm.train.metrics import METRICS_FILE
from raylm.tune.asha import WORST_VALUE, RungBook, rung_reports
from raylm.tune.results import TrialRecord, finite, pick_best


def test_asha_pauses_until_a_trial_is_among_the_best_third_and_stops_the_hopeless():
    book = RungBook([100, 300], reduction_factor=3, total_trials=9)
    assert book.arrive("a", 99, 5.0) == []  # below the first rung
    (a,) = book.arrive("a", 120, 5.0)
    assert (a.rung, a.milestone_tokens, a.tokens, a.cutoff, a.action, a.event) == (
        0,
        100,
        120,
        None,
        "pause",
        "report",
    )
    assert book.arrive("a", 130, 4.0) == []  # judged once per rung
    assert [d.action for d in book.arrive("b", 100, 4.0)] == ["pause"]  # floor(2 / 3) = 0 promotions yet
    c, b = book.arrive("c", 110, 6.0)  # n = 3: the best, b, is promoted; c, behind a, may still be
    assert (c.trial, c.action, c.cutoff) == ("c", "pause", 4.0)
    assert (b.trial, b.action, b.event, b.tokens) == ("b", "continue", "later report", 100)
    assert book.action_of("b", 0) == "continue" and book.action_of("c", 0) == "pause"
    # d leads now: ahead of c are d and a, and with b promoted that is all 3 rung 0 can ever promote
    assert [(d.trial, d.action) for d in book.arrive("d", 100, 3.0)] == [("d", "pause"), ("c", "stop")]
    assert [(d.trial, d.action) for d in book.arrive("e", 100, 7.0)] == [("e", "stop")]
    f, d, a = book.arrive("f", 100, 3.5)  # n = 6: a second promotion, the best paused trial, d
    assert [(x.trial, x.action) for x in (f, d, a)] == [("f", "pause"), ("d", "continue"), ("a", "stop")]
    assert book.waiting() == [("f", 0)]
    assert [(d.trial, d.action) for d in book.arrive("b", 300, 3.0)] == [("b", "pause")]


def test_every_arrival_order_promotes_a_third_at_each_rung():
    """Whatever the order the 9 trials reach the rungs in, rung 0 promotes 3 and rung 1 one: the tokens are fixed."""
    values = [3.3, 2.9, 4.1, 3.0, 3.8, 2.7, 3.5, 4.4, 3.1]
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(9)
        book = RungBook([100, 300], reduction_factor=3, total_trials=9)
        for trial in order:
            book.arrive(str(trial), 100, values[trial])
        promoted = [t for t, k in book.promoted if k == 0]
        assert len(promoted) == 3, (seed, promoted)
        for trial in sorted(promoted, key=lambda t: values[int(t)]):
            book.arrive(trial, 300, values[int(trial)] - 0.5)
        assert book.close() == [] and len([1 for _, k in book.promoted if k == 1]) == 1
        assert not book.waiting()


def test_a_rung_no_other_trial_can_reach_decides_at_once():
    book = RungBook([100, 300], reduction_factor=3, total_trials=2)
    assert [d.action for d in book.arrive("a", 100, 4.0)] == ["pause"]
    # b is better, and the one promotion rung 0 can make is b's; b is also the last trial rung 0 can see, so it
    # goes on at once although floor(2 / 3) = 0
    assert [(d.trial, d.action, d.event) for d in book.arrive("b", 100, 3.0)] == [
        ("b", "continue", "report"),
        ("a", "stop", "later report"),
    ]
    assert [(d.trial, d.action) for d in book.arrive("b", 300, 2.0)] == [
        ("b", "continue")
    ]  # none else can come
    single = RungBook([100, 300], reduction_factor=3, total_trials=1)  # a sweep of one trial never pauses
    assert [d.action for d in single.arrive("a", 100, 4.0) + single.arrive("a", 300, 3.0)] == ["continue"] * 2


def test_close_promotes_one_where_too_few_arrived_then_stops_the_rest():
    book = RungBook([100, 300], reduction_factor=3)  # the trial count unknown: only close() ends a wait
    book.arrive("a", 100, 4.0)
    assert [(d.trial, d.action) for d in book.arrive("b", 100, 3.0)] == [("b", "pause")]
    (promoted,) = book.close()  # nothing runs any more: rung 0 promotes one although floor(2 / 3) = 0
    assert (promoted.trial, promoted.action, promoted.event) == ("b", "continue", "rung closed")
    assert [d.action for d in book.arrive("b", 300, 2.0)] == ["pause"]
    assert [(d.trial, d.rung, d.action) for d in book.close()] == [("b", 1, "continue")]
    assert [(d.trial, d.rung, d.action) for d in book.close()] == [("a", 0, "stop")]
    assert book.close() == [] and not book.waiting()


def test_a_diverged_value_is_stopped_and_written_as_null():
    book = RungBook([100], reduction_factor=3, total_trials=3)
    book.arrive("a", 100, 3.0)
    (decision,) = book.arrive("b", 100, math.inf)
    assert decision.action == "stop" and decision.value is None
    assert [(d.trial, d.action) for d in book.arrive("c", 100, 3.5)] == [("c", "stop"), ("a", "continue")]
    assert finite(math.nan) is None and finite(2.0) == 2.0


def write_rows(trials_dir: Path, trial: str, rows: list[dict]) -> None:
    (trials_dir / trial).mkdir(parents=True, exist_ok=True)
    (trials_dir / trial / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))


def row(step: int, time: float, val_loss: float | None, rung: int | None = None) -> dict:
    found = {"step": step, "tokens": (step + 1) * 50, "time": time, "loss": 9.0, "val_loss": val_loss}
    return {**found, "rung_tokens": rung} if rung else found


def test_rebuild_counts_a_rung_row_the_decisions_file_lacks(tmp_path):
    """Trials a, b and c reached the rung at 100 tokens (step 1) in that order; the driver wrote the decisions of a
    and b, then died before c's. Rebuilt from the rows, c's value still counts, and c, never decided, is judged when
    it reports the rung again, while a and b keep what was decided for them."""
    live = RungBook([100, 300], reduction_factor=3, total_trials=6)
    decisions = [vars(d) for d in live.arrive("a", 100, 3.0) + live.arrive("b", 100, 3.2)]
    write_rows(tmp_path, "a", [row(0, 1.0, None), row(1, 2.0, 3.0, rung=100), row(2, 9.0, 2.9)])
    write_rows(tmp_path, "b", [row(1, 3.0, 3.2, rung=100)])
    write_rows(tmp_path, "c", [row(0, 1.5, None), row(1, 4.0, 4.0, rung=100)])
    reports = rung_reports(tmp_path, "val_loss")
    assert [(r.trial, r.tokens, r.value) for r in reports] == [
        ("a", 100, 3.0),
        ("b", 100, 3.2),
        ("c", 100, 4.0),
    ]

    book = RungBook([100, 300], reduction_factor=3, total_trials=6)
    book.rebuild(list(reversed(reports)), decisions)  # time order, whatever the files' order
    assert list(book.recorded[0].items()) == [("a", 3.0), ("b", 3.2), ("c", 4.0)]
    assert (
        book.arrive("a", 100, 3.0) == [] and book.action_of("a", 0) == "pause"
    )  # decided before the restore
    assert book.action_of("c", 0) == "continue"  # never judged: it reports again and is judged then
    c, a = book.arrive(
        "c", 100, 4.0
    )  # n = 3: a, the best, is promoted; behind b, c can never be (2 of 6 are)
    assert (c.action, a.trial, a.action) == ("stop", "a", "continue")
    assert book.action_of("a", 0) == "continue"
    again = RungBook([100, 300], reduction_factor=3, total_trials=6)
    again.rebuild(reports, decisions + [vars(c), vars(a)])
    assert again.action_of("a", 0) == "continue" and again.action_of("c", 0) == "stop"
    assert again.waiting() == [("b", 0)]


def test_rebuild_records_a_diverged_rung_row_as_worst(tmp_path):
    write_rows(tmp_path, "a", [row(1, 1.0, None, rung=100)])
    book = RungBook([100], reduction_factor=3)
    book.rebuild(rung_reports(tmp_path, "val_loss"), [])
    assert book.recorded == {0: {"a": WORST_VALUE}}


def test_fifo_records_but_never_stops():
    book = RungBook([100], reduction_factor=3, stops=False)
    book.arrive("a", 100, 1.0)
    assert [d.action for d in book.arrive("b", 100, 9.0)] == ["record"]


def record(name, status, last):
    return TrialRecord(
        name=name,
        trial_id=name,
        folder="",
        params={},
        status=status,
        tokens=1,
        steps=1,
        last=last,
        best=last,
        rungs={},
        wall_s=0.0,
    )


def test_best_is_never_diverged_stopped_or_failed():
    records = [
        record("d", "diverged", None),
        record("s", "stopped", 1.0),
        record("e", "error", None),
        record("f", "finished", 3.0),
        record("g", "finished", 2.5),
    ]
    assert pick_best(records).name == "g"
