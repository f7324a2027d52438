"""ASHA on tokens: the rung book's decisions from a table, its records rebuilt from the trials' rung rows after a
restore, divergence is never best."""

import json
import math
from pathlib import Path

import numpy as np

from raylm.train.metrics import METRICS_FILE
from raylm.tune.asha import WORST_VALUE, RungBook, decided_rungs, rung_reports
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


def write_rows(trials_dir: Path, trial: str, rows: list[dict]) -> None:
    (trials_dir / trial).mkdir(parents=True, exist_ok=True)
    (trials_dir / trial / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))


def row(step: int, time: float, val_loss: float | None, rung: int | None = None) -> dict:
    found = {"step": step, "tokens": (step + 1) * 50, "time": time, "loss": 9.0, "val_loss": val_loss}
    return {**found, "rung_tokens": rung} if rung else found


def test_rebuild_counts_a_rung_row_the_decisions_file_lacks(tmp_path):
    """Trials a, b and c reached the rung at 100 tokens (step 1) in that order; the driver wrote the decisions of a
    and b, then died before c's. Rebuilt from the rows, c's value still counts for d, and c, never decided, is
    judged when it reports the rung again (against a and b, which came before it), while a is not judged twice."""
    live = RungBook([100, 300], reduction_factor=3)
    decisions = [vars(live.decide("a", 100, 3.0)), vars(live.decide("b", 100, 3.2))]
    write_rows(tmp_path, "a", [row(0, 1.0, None), row(1, 2.0, 3.0, rung=100), row(2, 9.0, 2.9)])
    write_rows(tmp_path, "b", [row(1, 3.0, 3.2, rung=100)])
    write_rows(tmp_path, "c", [row(0, 1.5, None), row(1, 4.0, 4.0, rung=100)])
    reports = rung_reports(tmp_path, "val_loss")
    assert [(r.trial, r.tokens, r.value) for r in reports] == [("a", 100, 3.0), ("b", 100, 3.2), ("c", 100, 4.0)]

    book = RungBook([100, 300], reduction_factor=3)
    book.rebuild(list(reversed(reports)), decided_rungs(decisions))  # time order, whatever the files' order
    assert list(book.recorded[0].items()) == [("a", 3.0), ("b", 3.2), ("c", 4.0)]
    assert book.decide("a", 100, 3.0) is None  # decided before the restore
    d = book.decide("d", 100, 3.1)
    assert d.cutoff == float(np.percentile([3.0, 3.2, 4.0], 100 / 3)) and d.action == "continue"
    without_c = RungBook([100, 300], reduction_factor=3)  # the records decisions.jsonl alone gave: c is missing
    without_c.rebuild([r for r in reports if r.trial != "c"], decided_rungs(decisions))
    assert without_c.decide("d", 100, 3.1).action == "stop"
    c = book.decide("c", 100, 4.0)
    assert c.cutoff == float(np.percentile([3.0, 3.2], 100 / 3)) and c.action == "stop"
    assert list(book.recorded[0]) == ["a", "b", "c", "d"]


def test_rebuild_records_a_diverged_rung_row_as_worst(tmp_path):
    write_rows(tmp_path, "a", [row(1, 1.0, None, rung=100)])
    book = RungBook([100], reduction_factor=3)
    book.rebuild(rung_reports(tmp_path, "val_loss"), set())
    assert book.recorded == {0: {"a": WORST_VALUE}}


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
