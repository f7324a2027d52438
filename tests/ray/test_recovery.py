"""Checkpoints on a real TorchTrainer: exact resume after a worker SIGKILLed from outside, kill -9 recovery by Ray
Train's restart, and `raylm export` of the recovered run (its weights read back by a plain forward:
tests/unit/test_export.py). Kills during a save, damaged checkpoints, the
resume policies and resumes across layouts run without Ray: tests/distributed/test_fault_runs.py."""

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


class WorkerKiller(threading.Thread):
    """SIGKILLs (or sends `signum` to) one Ray Train worker process once the run has logged `steps` rows (a lost
    node, as users see it) and, with `after_commit`, committed a checkpoint (a background save commits a step or
    more after the step that started it); `rows_at_kill` records how far the run was, so a test can check the
    kill landed mid-run, and `pid` / `killed_at` which worker and when."""

    def __init__(self, cfg, steps: int, signum: int = signal.SIGKILL, after_commit: bool = False):
        super().__init__(daemon=True)
        self.cfg, self.metrics = cfg, Path(cfg.run.dir) / cfg.run.name / "metrics.jsonl"
        self.steps, self.signum, self.rows_at_kill, self.pid, self.killed_at = steps, signum, None, None, None
        self.after_commit = after_commit
        self.start()

    def run(self):
        deadline = time.time() + 300
        while time.time() < deadline and self.rows_at_kill is None:
            rows = len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0
            if rows >= self.steps and (not self.after_commit or committed(self.cfg)):
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.pid, self.signum)
                        self.rows_at_kill, self.pid, self.killed_at = rows, proc.pid, time.time()
                        break
            time.sleep(0.05)


# slow: three runs (~40 s); make test keeps an outside SIGKILL resumed bit for bit (the kill -9 test below) and
# resumes in a new start of the group (tests/distributed/test_fault_runs.py)
@pytest.mark.slow
def test_kill_then_resume_is_bit_identical(ray_cluster, small_config, references):
    expected = references.losses(*STEPS, "parallel.pp=2")
    cfg = small_config("stopped", *STEPS, "parallel.pp=2", "fault.max_failures=0")
    killer = WorkerKiller(cfg, steps=3, after_commit=True)
    with pytest.raises(RaylmError, match="training failed"):
        train(cfg)
    killer.join()
    assert killer.rows_at_kill is not None and killer.rows_at_kill < cfg.train.max_steps
    assert committed(cfg), "the run stopped after its first checkpoint"
    train(cfg)  # checkpoint.resume=auto picks the newest committed checkpoint
    assert run_losses(cfg) == expected  # bit-identical, fp32 on CPU


def test_kill_minus_nine_recovers_by_itself_and_the_run_exports(
    ray_cluster, small_config, references, tmp_path
):
    """Ray Train restarts the group after a worker's SIGKILL; the run ends with the reference's losses, and
    `raylm export` turns its newest checkpoint into a Hugging Face folder."""
    expected = references.losses(*STEPS, "parallel.pp=2")
    cfg = small_config("recovers", *STEPS, "parallel.pp=2", "fault.max_failures=1")
    killer = WorkerKiller(cfg, steps=3)
    train(cfg)
    killer.join()
    assert killer.rows_at_kill is not None and killer.rows_at_kill < cfg.train.max_steps  # it died mid-run
    assert run_losses(cfg) == expected
    assert committed(cfg) == ["step-00000006", "step-00000008"]  # checkpoint.keep=2
    out = tmp_path / "export"
    from raylm.cli import main

    assert main(["export", str(Path(cfg.run.dir) / cfg.run.name), str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()
