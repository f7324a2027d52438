"""Checkpoints on a real TorchTrainer: exact resume, kill -9 recovery, fallback past a damaged checkpoint,
resume across layout changes, and export read back by a plain PyTorch forward."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from raylm.errors import RaylmError
from raylm.train.driver import train
from raylm.train.metrics import read_metrics

STEPS = ("train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=2")


def run_losses(cfg) -> list[tuple[float, str]]:
    """Each step's (loss, samples_sha): a resumed run must match an uninterrupted one in both, exactly."""
    rows = read_metrics(Path(cfg.run.dir) / cfg.run.name)
    assert [r["step"] for r in rows] == list(range(cfg.train.max_steps)), "each step logged once, in order"
    return [(r["loss"], r["samples_sha"]) for r in rows]


def committed(cfg) -> list[str]:
    folder = Path(cfg.run.dir) / cfg.run.name / "checkpoints"
    if not folder.exists():  # a run killed before its first commit
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def uninterrupted(request):
    return {}


def reference(small_config, uninterrupted, *layout):
    if layout not in uninterrupted:
        name = "ref-" + "-".join(o.split(".")[-1].replace("=", "") for o in layout)
        cfg = small_config(name, *STEPS, *layout)
        train(cfg)
        uninterrupted[layout] = run_losses(cfg)
    return uninterrupted[layout]


class WorkerKiller(threading.Thread):
    """SIGKILLs (or sends `signum` to) one Ray Train worker process once the run has logged `steps` rows (a lost
    node, as users see it); `rows_at_kill` records how far the run was, so a test can check the kill landed
    mid-run, and `pid` / `killed_at` which worker and when."""

    def __init__(self, cfg, steps: int, signum: int = signal.SIGKILL):
        super().__init__(daemon=True)
        self.metrics = Path(cfg.run.dir) / cfg.run.name / "metrics.jsonl"
        self.steps, self.signum, self.rows_at_kill, self.pid, self.killed_at = steps, signum, None, None, None
        self.start()

    def run(self):
        deadline = time.time() + 300
        while time.time() < deadline and self.rows_at_kill is None:
            rows = len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0
            if rows >= self.steps:
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.pid, self.signum)
                        self.rows_at_kill, self.pid, self.killed_at = rows, proc.pid, time.time()
                        break
            time.sleep(0.05)


def test_kill_then_resume_is_bit_identical(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, "parallel.pp=2")
    cfg = small_config("stopped", *STEPS, "parallel.pp=2", "fault.max_failures=0")
    killer = WorkerKiller(cfg, steps=3)
    with pytest.raises(RaylmError, match="training failed"):
        train(cfg)
    killer.join()
    assert killer.rows_at_kill is not None and killer.rows_at_kill < cfg.train.max_steps
    assert committed(cfg), "the run stopped after its first checkpoint"
    train(cfg)  # checkpoint.resume=auto picks the newest committed checkpoint
    assert run_losses(cfg) == expected  # bit-identical, fp32 on CPU


def test_kill_minus_nine_recovers_by_itself(ray_cluster, small_config, uninterrupted):
    expected = reference(small_config, uninterrupted, "parallel.pp=2")
    cfg = small_config("recovers", *STEPS, "parallel.pp=2", "fault.max_failures=1")
    killer = WorkerKiller(cfg, steps=3)
    train(cfg)
    killer.join()
    assert killer.rows_at_kill is not None and killer.rows_at_kill < cfg.train.max_steps  # it died mid-run
    assert run_losses(cfg) == expected
    assert committed(cfg) == ["step-00000006", "step-00000008"]  # checkpoint.keep=2


@pytest.mark.parametrize("phase, rank, resumes_at", [("before-files", 0, 2), ("mid-files", 1, 2),
                                                     ("before-commit", 0, 2), ("after-commit", 0, 4)])
def test_kill_during_save_resumes_from_the_newest_complete_checkpoint(ray_cluster, small_config, uninterrupted,
                                                                      phase, rank, resumes_at):
    expected = reference(small_config, uninterrupted, "parallel.pp=2")
    cfg = small_config(f"drill-{phase}", *STEPS, "parallel.pp=2", "fault.max_failures=1",
                       f"fault.drill={phase}@4", f"fault.drill_rank={rank}")
    train(cfg)
    run = Path(cfg.run.dir) / cfg.run.name
    assert (run / ".fault-drill-fired").read_text().strip() == f"{phase}@4"
    assert [r["resumed_from"] for r in read_metrics(run) if "resumed_from" in r] == [resumes_at]
    assert run_losses(cfg) == expected
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("tmp-")]


def test_damaged_newest_checkpoint_falls_back_or_fails(ray_cluster, small_config, uninterrupted):
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
        victim = next(p for p in sorted((Path(cfg.run.dir) / cfg.run.name / "checkpoints" / name).rglob("*.pt")))
        blob = bytearray(victim.read_bytes())
        blob[-3] ^= 0xFF
        victim.write_bytes(bytes(blob))
    with pytest.raises(RaylmError, match="every checkpoint in .* is damaged .*nothing was deleted") as failed:
        train(small_config("damaged", *STEPS, "train.max_steps=8"))
    assert failed.value.exit_code == 4 and committed(cfg) == folders  # not a silent restart from step 0


def test_resume_policy_never_and_required(ray_cluster, small_config):
    with pytest.raises(RaylmError, match="checkpoint.resume=required"):
        train(small_config("nothing-yet", "checkpoint.resume=required"))
    cfg = small_config("used", "checkpoint.resume=never")
    train(cfg)
    with pytest.raises(RaylmError, match="already holds a run"):
        train(cfg)


def test_resume_across_layout_changes(ray_cluster, small_config, uninterrupted):
    # a constant lr makes the schedule independent of max_steps, so one run can stop at 4 and 6 and go on
    constant = ("schedule.lr.kind=constant",)
    expected = reference(small_config, uninterrupted, *constant)
    layouts = [("parallel.pp=2", "parallel.tp=2"), ("parallel.dp=2",), ("parallel.pp=2",)]
    for max_steps, layout in zip((4, 6, 8), layouts):
        train(small_config("moves", *STEPS, *constant, f"train.max_steps={max_steps}", *layout))
    got = run_losses(small_config("moves", *STEPS, *constant))
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], rel=1e-5)
    assert [sha for _, sha in got] == [sha for _, sha in expected]  # the same samples despite three layouts


def test_export_matches_a_plain_pytorch_forward(ray_cluster, small_config, tmp_path):
    pytest.importorskip("safetensors")
    from raylm.checkpoint.export import export  # noqa: F401  (API checked in tests/unit/test_export*.py)

    cfg = small_config("exported", "parallel.tp=2", "train.max_steps=2")
    train(cfg)
    out = tmp_path / "export"
    from raylm.cli import main

    assert main(["export", str(Path(cfg.run.dir) / cfg.run.name), str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()
