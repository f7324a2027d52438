"""Start-up marks: phases between the marks that are set, one startup.jsonl row per start, the process's start."""

import time

from raylm.train.startup import StartupMarks, phases_of, process_started_at, read_startups


def test_a_phase_runs_from_the_latest_earlier_mark_that_is_set():
    marks = {
        "launched": 10.0,
        "train_called": 11.0,
        "fit_called": 12.5,
        "worker_entered": 15.0,
        "first_batch": 18.0,
    }
    # no ray_ready (Ray already up): run setup runs from train_called; no engine mark: the batch from worker entry
    assert phases_of(marks) == {
        "driver_s": 1.0,
        "run_setup_s": 1.5,
        "worker_start_s": 2.5,
        "first_batch_s": 3.0,
    }


def test_each_start_appends_a_row_and_a_mark_keeps_its_first_reading(tmp_path):
    for first_batch in (5.0, 9.0):
        marks = StartupMarks({"train_called": 1.0})
        marks.mark("first_batch", first_batch)
        marks.mark("first_batch", 99.0)
        marks.write(tmp_path)
    rows = read_startups(tmp_path)
    assert [row["phases"]["first_batch_s"] for row in rows] == [4.0, 8.0]
    assert read_startups(tmp_path / "none") == []


def test_this_process_started_before_now():
    started = process_started_at()
    assert started is not None and 0 < time.time() - started < 3600
