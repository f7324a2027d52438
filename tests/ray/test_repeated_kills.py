"""Repeated real kills on pp=2 dp=2 ZeRO-1: workers SIGKILLed at seeded random steps and save phases, and a Ray Data
read task SIGKILLed mid-run; each run must end bit-identical to an unkilled one, with exact data accounting."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from raylm.train.driver import train
from raylm.train.faults import FIRED_MARKER
from raylm.train.metrics import read_metrics
from tests.ray.test_recovery import committed, run_losses

LAYOUT = ("parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1", "checkpoint.every_steps=2")
SAVE_PHASES = ("before-files", "mid-files", "before-commit", "after-commit")
WORLD = 4


def resume_point(phase: str, step: int, every: int) -> int:
    """The checkpoint a group killed at (phase, step) restarts from: a step drill fires before that step's save."""
    return step if phase == "after-commit" else every * ((step - 1) // every)


def kill_plan(seed: int, kills: int, steps: int, every: int) -> list[tuple[str, int, int]]:
    """`kills` seeded random (phase, step, rank) kills: at least one during a save and one of a rank other than 0,
    each after a newer commit than the last one resumed, so that every restart leaves its own resumed_from row.
    A kill before-commit is of rank 0: rank 0 commits alone, so another rank killed there races its commit."""
    rng = random.Random(seed)
    while True:
        plan = []
        for step in sorted(rng.sample(range(every + 1, steps - 1), kills)):
            phase = rng.choice(SAVE_PHASES) if step % every == 0 and rng.random() < 0.6 else "step"
            plan.append((phase, step, 0 if phase == "before-commit" else rng.randrange(WORLD)))
        resumes = [resume_point(phase, step, every) for phase, step, _ in plan]
        if (
            any(phase != "step" for phase, _, _ in plan)
            and any(rank for _, _, rank in plan)
            and all(a < b for a, b in pairwise(resumes))
        ):
            return plan


def assert_exact_run(cfg, expected, resumed_from: list[int]) -> None:
    """Bit-identical losses and samples, each step logged once, exact tokens, one resumed_from row per restart."""
    run = Path(cfg.run.dir) / cfg.run.name
    assert run_losses(cfg) == expected
    rows = read_metrics(run)
    assert rows[-1]["tokens"] == cfg.train.max_steps * cfg.train.global_batch * cfg.data.seq_len
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] == resumed_from
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("tmp-")]
    assert committed(cfg)[-1] == f"step-{cfg.train.max_steps:08d}"


def runs_a_read_task(pid: int) -> bool:
    """Whether the process is executing a Ray Data read task now: Ray titles a worker `ray::<task name>` while it
    runs a task and `ray::IDLE` between tasks."""
    try:
        return "_read_task" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


class ReadTaskKiller(threading.Thread):
    """SIGKILLs, once, the worker process of a Ray Data read task that Ray's state API shows running in two looks
    2.5 s apart (the read@STEP drill holds one that long) and whose process title says it runs a read task now;
    `killed_pid` is its pid.

    The state API lags on a loaded machine and can keep a task RUNNING after its owner died, so its pid alone may by
    now be an idle worker, whose death Ray retries nothing for. With `after` (a drill's fired marker) only a task
    started after that drill fired is a candidate: the read tasks of the group restarted after that kill."""

    def __init__(self, after: Path | None = None):
        super().__init__(daemon=True)
        self.after = after
        self.killed_pid: int | None = None
        self.stop = threading.Event()
        self.start()

    def _gate_ms(self) -> int | None:
        """Wall-clock ms from which a started task may be killed; None while the gating drill has not fired."""
        if self.after is None:
            return 0
        return int(time.time() * 1000) if self.after.exists() and self.after.read_text().strip() else None

    def run(self):
        from ray.util.state import list_tasks

        gate_ms = None
        while gate_ms is None and not self.stop.is_set():
            gate_ms = self._gate_ms()
            time.sleep(0.2)
        seen: dict[str, float] = {}
        while not self.stop.is_set() and self.killed_pid is None:
            running = list_tasks(
                filters=[("state", "=", "RUNNING")], detail=True, raise_on_missing_output=False
            )
            now = time.monotonic()
            for task in (
                t
                for t in running
                if "_read_task" in t.name and t.worker_pid and (t.start_time_ms or 0) >= gate_ms
            ):
                if now - seen.setdefault(task.task_id, now) < 2.5:
                    continue
                if not runs_a_read_task(task.worker_pid):  # a stale entry: that task ended
                    seen[task.task_id] = float("inf")
                    continue
                os.kill(task.worker_pid, signal.SIGKILL)
                self.killed_pid = task.worker_pid
                break
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.join()

    def __enter__(self):
        return self


def assert_read_task_ran_again(killed_pid: int | None) -> None:
    """The read task the SIGKILL interrupted (its attempt on that pid FAILED) has a later attempt."""
    from ray.util.state import list_tasks

    assert killed_pid is not None, "no read task was caught running"
    deadline = time.monotonic() + 30.0  # task events reach the state API in batches: a loaded machine lags
    while True:
        failed = [
            t
            for t in list_tasks(
                filters=[("state", "=", "FAILED")], detail=True, raise_on_missing_output=False
            )
            if t.worker_pid == killed_pid and "_read_task" in t.name
        ]
        attempts = {
            t.task_id: [
                a.attempt_number
                for a in list_tasks(filters=[("task_id", "=", t.task_id)], raise_on_missing_output=False)
            ]
            for t in failed
        }
        if any(max(numbers) > 0 for numbers in attempts.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert any(max(numbers) > 0 for numbers in attempts.values()), (killed_pid, attempts)  # Ray ran it again


def run_with_kills(
    small_config,
    references,
    name: str,
    plan: list[tuple[str, int, int]],
    steps: int,
    kill_a_read_task: bool = False,
) -> None:
    """Train with the planned worker SIGKILLs (and a read task SIGKILLed after the first restart); exactly
    len(plan) restarts are allowed, so a read-task kill that restarted the group would fail the run."""
    resumes = [resume_point(phase, step, 2) for phase, step, _ in plan]
    drill = ",".join(f"{phase}@{step}:{rank}" for phase, step, rank in plan)
    drill += f",read@{resumes[0]}" if kill_a_read_task else ""
    cfg = small_config(
        name, *LAYOUT, f"train.max_steps={steps}", f"fault.max_failures={len(plan)}", f"fault.drill={drill}"
    )
    marker = Path(cfg.run.dir) / cfg.run.name / FIRED_MARKER
    with ReadTaskKiller(after=marker) if kill_a_read_task else contextlib.nullcontext() as killer:
        train(cfg)
    fired = marker.read_text().split()
    assert fired == [f"{phase}@{step}" for phase, step, _ in plan]  # every kill happened, in order
    assert_exact_run(cfg, references.losses(*LAYOUT, f"train.max_steps={steps}"), resumes)
    if kill_a_read_task:
        assert killer.killed_pid is not None, "no read task was caught running"
    if kill_a_read_task and len(plan) == 1:
        # With a later planned kill the state API may never show the retry: in two of four runs of the two-kills
        # test it showed no FAILED attempt on the killed pid, though the raylet logged the retry and the run was
        # exact. Most likely the later kill takes down the task's owner, whose task events carry that attempt.
        assert_read_task_ran_again(killer.killed_pid)


# slow since make test passed 15 minutes (107 s here); make test keeps the kill -9 recovery of
# tests/ray/test_recovery.py and a kill at every save phase in tests/distributed/test_fault_runs.py
@pytest.mark.slow
def test_a_rank_killed_mid_save_and_a_read_task_killed_recover_exactly(ray_cluster, small_config, references):
    # rank 3 (pipeline stage 1, DP rank 1) dies while it writes the step-4 checkpoint; the group resumes from step 2
    run_with_kills(
        small_config, references, "mid-save", [("mid-files", 4, 3)], steps=8, kill_a_read_task=True
    )


@pytest.mark.slow
def test_two_kills_and_a_read_task_kill_recover_exactly(ray_cluster, small_config, references):
    run_with_kills(
        small_config,
        references,
        "two-kills",
        kill_plan(3, 2, 12, every=2),
        steps=12,
        kill_a_read_task=True,
    )


@pytest.mark.slow
def test_five_kills_over_forty_steps_recover_exactly(ray_cluster, small_config, references):
    run_with_kills(small_config, references, "five-kills", kill_plan(12, 5, 40, every=2), steps=40)


@pytest.mark.slow
def test_killed_read_task_is_retried_without_a_restart(ray_cluster, small_config, references):
    cfg = small_config(
        "read-task-killed", *LAYOUT, "train.max_steps=8", "fault.max_failures=0", "fault.drill=read@0"
    )
    with ReadTaskKiller() as killer:
        train(cfg)  # max_failures=0: a worker-group restart would fail the run
    assert_read_task_ran_again(killer.killed_pid)
    assert_exact_run(cfg, references.losses(*LAYOUT, "train.max_steps=8"), resumed_from=[])
