"""Faults and resumes of whole training runs without Ray: raylm's Trainer on gloo ranks in plain processes
(dist_runs.py). A rank killed during a save, a NaN loss on one rank under each fault.nonfinite policy, a
loss spike, a damaged newest checkpoint, the resume policies, a resume across layout changes and the
plateau lr schedule across a resume, each checked against an uninterrupted run (exact losses and sample ids,
samples_sha, where the layout stays). What needs Ray itself
(workers killed from outside, read tasks, placement, Tune, several nodes) stays in tests/ray.

The three NaN runs share one process group (module-scoped), as test_parity.py batches layouts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the helpers by module name

from dist_runs import DP2, PP2, STEPS, committed, run_losses, train_many, train_plain, world_of  # noqa: E402

from raylm.errors import RaylmError  # noqa: E402
from raylm.train.faults import SPIKE_LR_FACTOR  # noqa: E402
from raylm.train.metrics import read_metrics  # noqa: E402
from raylm.train.schedule import lr_at  # noqa: E402
from tests.conftest import small_configs  # noqa: E402

pytestmark = pytest.mark.runs
BATCH = 8  # train.global_batch of the small config


def train(cfg) -> None:
    train_plain(cfg, world_of(cfg))


def rows_of(cfg) -> list[dict]:
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(len(rows))), "each step logged once, in order"
    return rows


def checkpoint_dir(cfg, name: str) -> Path:
    return Path(cfg.run.dir) / cfg.run.name / "checkpoints" / name


def trainer_state(cfg, name: str) -> dict:
    return json.loads((checkpoint_dir(cfg, name) / "trainer_state.json").read_text())


def assert_model_files_finite(cfg) -> None:
    for name in committed(cfg):
        for path in sorted((checkpoint_dir(cfg, name) / "model").glob("*.pt")):
            for key, tensor in torch.load(path, weights_only=True).items():
                assert torch.isfinite(tensor).all(), f"{path} {key}"


@pytest.mark.parametrize(
    "phase, rank, resumes_at",
    [("before-files", 0, 2), ("mid-files", 1, 2), ("before-commit", 0, 2), ("after-commit", 0, 4)],
)
def test_kill_during_save_resumes_from_the_newest_complete_checkpoint(
    small_config, references, phase, rank, resumes_at
):
    expected = references.losses(*PP2)
    cfg = small_config(
        f"drill-{phase}", *PP2, "fault.max_failures=1", f"fault.drill={phase}@4", f"fault.drill_rank={rank}"
    )
    train(cfg)
    run = Path(cfg.run.dir) / cfg.run.name
    assert (run / ".fault-drill-fired").read_text().strip() == f"{phase}@4"
    assert [r["resumed_from"] for r in read_metrics(run) if "resumed_from" in r] == [resumes_at]
    assert run_losses(cfg) == expected
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("tmp-")]


NAN = ("fault.drill=nonfinite@3", "fault.drill_rank=1")


@pytest.fixture(scope="module")
def nan_runs(prepared, small_corpus, tmp_path_factory):
    """The skip, stop and rollback runs, one after another in one two-rank group: {name: (cfg, error)}."""
    build = small_configs(prepared, small_corpus, tmp_path_factory.mktemp("nan-runs"))
    cfgs = [
        # rank 1 also sleeps 0.5 s after every step: a straggler (two ranks: the median is their mean)
        build(
            "nan-skip",
            *DP2,
            "fault.drill=nonfinite@3,slow@0",
            "fault.drill_rank=1",
            "fault.straggler_factor=1.2",
        ),
        build("nan-stop", *DP2, *NAN, "fault.nonfinite=stop", "fault.max_failures=1"),
        build(
            "nan-rollback",
            *DP2,
            "checkpoint.every_steps=4",
            "checkpoint.keep=3",
            "fault.drill=nonfinite@5",
            "fault.drill_rank=1",
            "fault.nonfinite=rollback",
        ),
    ]
    errors = train_many(cfgs, world_size=2)
    return {cfg.run.name: (cfg, error) for cfg, error in zip(cfgs, errors, strict=False)}


def test_nonfinite_skip_advances_the_cursor_and_logs_the_samples(nan_runs, references):
    expected = references.losses(*DP2)
    cfg, error = nan_runs["nan-skip"]
    assert error is None and cfg.fault.nonfinite == "skip"  # the default
    rows = rows_of(cfg)
    assert len(rows) == cfg.train.max_steps
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]  # the same samples, step by step
    assert [r["loss"] for r in rows[:3]] == [loss for loss, _ in expected[:3]]
    assert rows[3]["loss"] is None
    assert rows[3]["skipped"] == {
        "reason": "nonfinite",
        "samples": [3 * BATCH, 4 * BATCH],
        "loss_ranks": [1],
        "grad_ranks": [0, 1],
    }
    assert all("skipped" not in r and r["loss"] is not None for r in rows[4:])
    assert rows[4]["loss"] != expected[4][0]  # trained on without step 3's update
    last = json.loads((checkpoint_dir(cfg, committed(cfg)[-1]) / "engine.json").read_text())
    assert (last["adam_step"], last["skipped_steps"]) == (cfg.train.max_steps - 1, 1)
    assert_model_files_finite(cfg)


def test_a_slowed_rank_is_the_slowest_and_named_once(nan_runs):
    """The slow@0 drill on rank 1 of the skip run: every report row names it the slowest rank, and it is named a
    straggler once (after fault.straggler_steps slow steps in a row)."""
    cfg, _ = nan_runs["nan-skip"]
    rows = rows_of(cfg)
    reported = [r for r in rows if "slowest_rank" in r]
    assert [r["step"] + 1 for r in reported] == list(
        range(2, cfg.train.max_steps + 1, cfg.train.report_every)
    )
    assert all(r["slowest_rank"] == 1 and r["slowest_rank_s"] > r["median_rank_s"] for r in reported), (
        reported
    )
    (named,) = [r["straggler"] for r in rows if "straggler" in r]
    assert named["rank"] == 1 and named["steps"] == cfg.fault.straggler_steps, named
    assert named["work_s"] > cfg.fault.straggler_factor * named["median_s"]


def test_nonfinite_stop_names_step_and_rank_and_commits_nothing_from_it(nan_runs):
    cfg, error = nan_runs["nan-stop"]
    assert isinstance(error, RaylmError)
    stop = r"step 3: the loss is not finite on rank 1.*fault.nonfinite=stop"
    with pytest.raises(RaylmError, match=stop) as info:
        raise error
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert committed(cfg) == ["step-00000002"]  # none at or after the bad step
    rows = rows_of(cfg)
    assert len(rows) == 3 and not any("resumed_from" in r for r in rows)  # a user error: not retried


def test_nonfinite_rollback_skips_the_window_and_records_it(nan_runs, references):
    expected = references.losses(*DP2)
    cfg, error = nan_runs["nan-rollback"]
    assert error is None
    rows = rows_of(cfg)
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]
    assert [r["loss"] for r in rows[:5]] == [loss for loss, _ in expected[:5]]
    # steps 4 and 5 are never trained on
    window = {"step": 5, "to_step": 4, "samples": [4 * BATCH, 6 * BATCH]}
    assert rows[5]["rollback"] == window and rows[5]["nonfinite"]["loss_ranks"] == [1]
    # committed at once (step 6 is no checkpoint.every_steps step), so a restart resumes past the window too
    assert committed(cfg) == ["step-00000004", "step-00000006", "step-00000008"]
    state = trainer_state(cfg, "step-00000006")
    assert state["samples"] == 6 * BATCH and state["rolled_back"] == [window]
    assert_model_files_finite(cfg)


def test_spike_warns_then_rolls_back(small_config, references):
    expected = references.losses(*DP2)
    spike = ("fault.drill=spike@5", "fault.spike_window=4", "fault.spike_sigma=3", "checkpoint.every_steps=4")
    warned = small_config("spike-warn", *DP2, *spike)
    rolled = small_config("spike-rollback", *DP2, *spike, "fault.spike=rollback")
    assert train_many([warned, rolled], world_size=2) == [None, None]
    rows = rows_of(warned)
    c = warned
    assert rows[5]["lr"] == lr_at(5, c.optim.lr, c.train.max_steps, c.schedule.lr, 1.0) * SPIKE_LR_FACTOR
    # step 5's update shows in step 6's loss; the loss stays far above the window, which keeps spikes out
    assert [r["step"] for r in rows if "spike" in r] == [6, 7]
    assert rows[6]["spike"]["samples"] == [6 * BATCH, 7 * BATCH] and rows[6]["spike"]["action"] == "warn"
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]
    rows = rows_of(rolled)
    assert rows[6]["rollback"] == {"step": 6, "to_step": 4, "samples": [4 * BATCH, 7 * BATCH]}
    assert rows[7]["loss"] < rows[6]["loss"] / 2  # back on the checkpoint's weights
    assert [r["samples_sha"] for r in rows] == [sha for _, sha in expected]


def test_damaged_newest_checkpoint_falls_back_or_fails(small_config):
    cfg = small_config("damaged", *STEPS, "train.max_steps=4")
    train(cfg)
    newest = Path(cfg.run.dir) / cfg.run.name / "checkpoints" / committed(cfg)[-1]
    victim = next(p for p in sorted(newest.rglob("*.pt")))
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(RaylmError, match=victim.name):
        train(small_config("damaged", *STEPS, "train.max_steps=4", "checkpoint.resume=required"))
    train(small_config("damaged", *STEPS, "train.max_steps=6"))  # auto: falls back to step 2 with a warning
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(6))
    folders = committed(cfg)
    for name in folders:  # same sizes, other bytes: only the ranks' sha256 checks can tell
        victim = next(p for p in sorted(checkpoint_dir(cfg, name).rglob("*.pt")))
        blob = bytearray(victim.read_bytes())
        blob[-3] ^= 0xFF
        victim.write_bytes(bytes(blob))
    with pytest.raises(RaylmError, match="every checkpoint in .* is damaged .*nothing was deleted") as failed:
        train(small_config("damaged", *STEPS, "train.max_steps=8"))
    assert failed.value.exit_code == 4 and committed(cfg) == folders  # not a silent restart from step 0


def test_resume_policy_never_and_required(small_config):
    with pytest.raises(RaylmError, match="checkpoint.resume=required"):
        train(small_config("nothing-yet", "checkpoint.resume=required"))
    cfg = small_config("used", "checkpoint.resume=never")
    train(cfg)
    with pytest.raises(RaylmError, match="already holds a run"):
        train(cfg)


def test_resume_across_layout_changes(small_config, references):
    # a constant lr makes the schedule independent of max_steps, so one run can stop at 4 and 6 and go on
    constant = ("schedule.lr.kind=constant",)
    expected = references.losses(*STEPS, *constant)
    layouts = [("parallel.pp=2", "parallel.tp=2"), ("parallel.dp=2",), ("parallel.pp=2",)]
    for max_steps, layout in zip((4, 6, 8), layouts, strict=False):
        train(small_config("moves", *STEPS, *constant, f"train.max_steps={max_steps}", *layout))
    got = run_losses(small_config("moves", *STEPS, *constant))
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], rel=1e-5)
    assert [sha for _, sha in got] == [sha for _, sha in expected]  # the same samples despite three layouts


def test_plateau_lr_survives_a_resume(small_config):
    """The plateau schedule's state rides in the checkpoint: 4 steps, then a resume to 8, gives the lr sequence
    of one uninterrupted 8-step run (a patience of 1 and a huge threshold cut the lr at every evaluation)."""
    plateau = [
        "schedule.lr.kind=plateau",
        "schedule.lr.patience=1",
        "schedule.lr.threshold=0.9",
        "schedule.lr.factor=0.5",
        "schedule.lr.min_lr_frac=0.01",
        "train.eval_every=1",
        "train.max_steps=8",
    ]
    whole = small_config("plateau-whole", *plateau)
    first = small_config("plateau-resumed", *plateau, "train.max_steps=4")
    assert train_many([whole, first], world_size=1) == [None, None]
    train(small_config("plateau-resumed", *plateau))
    lrs = [[r["lr"] for r in read_metrics(Path(c.run.dir) / c.run.name)] for c in (whole, first)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 8 and lrs[0][-1] < lrs[0][2] / 8, lrs


@pytest.mark.slow
def test_a_document_masked_run_resumes_exactly(small_config):
    """data.document_mask at pp=2, the whole path (stream -> (tokens, doc_ids, positions) -> boundaries sent
    between stages): 3 steps, then a resume to 6, gives the losses and samples of one uninterrupted 6-step run,
    bit for bit. (The small corpus's documents are long, so few of these windows hold a boundary: what the mask
    does is tested in tests/unit/test_document_mask.py and the masked layouts of test_parity.py.)"""
    masked = ("data.document_mask=true", "data.document_positions=restart", "parallel.pp=2")
    constant = ("schedule.lr.kind=constant",)  # the schedule does not depend on max_steps
    whole = small_config("docs-whole", *masked, *constant, "train.max_steps=6")
    first = small_config("docs-resumed", *masked, *constant, "train.max_steps=3")
    assert train_many([whole, first], world_size=2) == [None, None]
    train(small_config("docs-resumed", *masked, *constant, "train.max_steps=6"))
    assert run_losses(small_config("docs-resumed", *masked, *constant, "train.max_steps=6")) == run_losses(
        whole
    )


@pytest.mark.slow
def test_a_seq_len_warmup_resumes_exactly_across_a_window_change(small_config):
    """schedule.seq_len at pp=2 (DeepSpeed's pipeline sends the new activation shapes at each change, and at
    each evaluation, which reads whole windows): windows 8, 8, 16, 16, 32, 32. Stopped after 3 steps, when the
    window has changed once, and resumed to 6, the run trains the samples and losses of one uninterrupted 6-step
    run and ends with the same weights, bit for bit."""
    warmup = (
        "schedule.seq_len.start=8",
        "schedule.seq_len.warmup_steps=4",
        "parallel.pp=2",
        "train.eval_every=2",
        "schedule.lr.kind=constant",  # the schedule does not depend on max_steps
    )
    whole = small_config("warmup-whole", *warmup, "train.max_steps=6")
    first = small_config("warmup-resumed", *warmup, "train.max_steps=3")
    assert train_many([whole, first], world_size=2) == [None, None]
    resumed = small_config("warmup-resumed", *warmup, "train.max_steps=6")
    train(resumed)
    assert [r["seq_len"] for r in rows_of(resumed)] == [8, 8, 16, 16, 32, 32]
    assert rows_of(resumed)[3]["resumed_from"] == 3
    assert run_losses(resumed) == run_losses(whole)
    name = committed(whole)[-1]
    files = sorted((checkpoint_dir(whole, name) / "model").glob("*.pt"))
    assert name == committed(resumed)[-1] == "step-00000006" and files
    for path in files:
        again = torch.load(checkpoint_dir(resumed, name) / "model" / path.name, weights_only=True)
        for key, tensor in torch.load(path, weights_only=True).items():
            assert torch.equal(tensor, again[key]), f"{path.name} {key}"
