"""Repeated real kills on pp=2 dp=2 ZeRO-1: workers SIGKILLed at seeded random steps and save phases, and a Ray Data
read task SIGKILLed mid-run; each run must end bit-identical to an unkilled one, with exact data accounting."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
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
        if (any(phase != "step" for phase, _, _ in plan) and any(rank for _, _, rank in plan)
                and all(a < b for a, b in zip(resumes, resumes[1:]))):
            return plan


@pytest.fixture(scope="module")
def unkilled(request):
    return {}


def unkilled_run(small_config, unkilled, steps: int) -> list[tuple[float, str]]:
    if steps not in unkilled:
        cfg = small_config(f"unkilled-{steps}", *LAYOUT, f"train.max_steps={steps}")
        train(cfg)
        unkilled[steps] = run_losses(cfg)
    return unkilled[steps]


def assert_exact_run(cfg, expected, resumed_from: list[int]) -> None:
    """Bit-identical losses and samples, each step logged once, exact tokens, one resumed_from row per restart."""
    run = Path(cfg.run.dir) / cfg.run.name
    assert run_losses(cfg) == expected
    rows = read_metrics(run)
    assert rows[-1]["tokens"] == cfg.train.max_steps * cfg.train.global_batch * cfg.data.seq_len
    assert [r["resumed_from"] for r in rows if "resumed_from" in r] == resumed_from
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("tmp-")]
    assert committed(cfg)[-1] == f"step-{cfg.train.max_steps:08d}"


class ReadTaskKiller(threading.Thread):
    """SIGKILLs the worker process of a Ray Data read task that Ray's state API shows running in two looks 2.5 s
    apart (the read@STEP drill holds one that long), once; `killed` = (task_id, pid).

    With `after` (a drill's fired marker), only a task started after that drill fired is a candidate: a read task of
    the worker group that drill killed can stay RUNNING in the state API after its owner died (its last events die
    with it), and its pid may by then be an idle worker whose death Ray retries nothing for."""

    def __init__(self, after: Path | None = None):
        super().__init__(daemon=True)
        self.after = after
        self.killed: tuple[str, int] | None = None
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
        while not self.stop.is_set() and self.killed is None:
            running = list_tasks(filters=[("state", "=", "RUNNING")], detail=True, raise_on_missing_output=False)
            now = time.monotonic()
            for task in (t for t in running if "_read_task" in t.name and t.worker_pid
                         and (t.start_time_ms or 0) >= gate_ms):
                if now - seen.setdefault(task.task_id, now) >= 2.5:
                    try:
                        os.kill(task.worker_pid, signal.SIGKILL)
                    except ProcessLookupError:  # a stale entry: the task ended with an earlier run's dataset
                        seen[task.task_id] = float("inf")
                        continue
                    self.killed = (task.task_id, task.worker_pid)
                    break
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.join()

    def __enter__(self):
        return self


def assert_read_task_ran_again(killed: tuple[str, int] | None) -> None:
    from ray.util.state import list_tasks

    assert killed is not None, "no read task was caught running"
    deadline = time.monotonic() + 30.0  # task events reach the state API in batches: a loaded machine lags
    while True:
        attempts = list_tasks(filters=[("task_id", "=", killed[0])], raise_on_missing_output=False)
        if max(t.attempt_number for t in attempts) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert max(t.attempt_number for t in attempts) >= 1, attempts  # Ray ran the killed task again


def run_with_kills(small_config, unkilled, name: str, plan: list[tuple[str, int, int]], steps: int,
                   kill_a_read_task: bool = False) -> None:
    """Train with the planned worker SIGKILLs (and a read task SIGKILLed after the first restart); exactly
    len(plan) restarts are allowed, so a read-task kill that restarted the group would fail the run."""
    resumes = [resume_point(phase, step, 2) for phase, step, _ in plan]
    drill = ",".join(f"{phase}@{step}:{rank}" for phase, step, rank in plan)
    drill += f",read@{resumes[0]}" if kill_a_read_task else ""
    cfg = small_config(name, *LAYOUT, f"train.max_steps={steps}", f"fault.max_failures={len(plan)}",
                       f"fault.drill={drill}")
    marker = Path(cfg.run.dir) / cfg.run.name / FIRED_MARKER
    with ReadTaskKiller(after=marker) if kill_a_read_task else contextlib.nullcontext() as killer:
        train(cfg)
    fired = marker.read_text().split()
    assert fired == [f"{phase}@{step}" for phase, step, _ in plan]  # every kill happened, in order
    assert_exact_run(cfg, unkilled_run(small_config, unkilled, steps), resumes)
    if kill_a_read_task:
        assert_read_task_ran_again(killer.killed)


def test_a_rank_killed_mid_save_and_a_read_task_killed_recover_exactly(ray_cluster, small_config, unkilled):
    # rank 3 (pipeline stage 1, DP rank 1) dies while it writes the step-4 checkpoint; the group resumes from step 2
    run_with_kills(small_config, unkilled, "mid-save", [("mid-files", 4, 3)], steps=8, kill_a_read_task=True)


@pytest.mark.slow
def test_two_kills_and_a_read_task_kill_recover_exactly(ray_cluster, small_config, unkilled):
    run_with_kills(small_config, unkilled, "two-kills", kill_plan(3, 2, 12, every=2), steps=12, kill_a_read_task=True)


@pytest.mark.slow
def test_five_kills_over_forty_steps_recover_exactly(ray_cluster, small_config, unkilled):
    run_with_kills(small_config, unkilled, "five-kills", kill_plan(12, 5, 40, every=2), steps=40)


@pytest.mark.slow
def test_killed_read_task_is_retried_without_a_restart(ray_cluster, small_config, unkilled):
    cfg = small_config("read-task-killed", *LAYOUT, "train.max_steps=8", "fault.max_failures=0", "fault.drill=read@0")
    with ReadTaskKiller() as killer:
        train(cfg)  # max_failures=0: a worker-group restart would fail the run
    assert_read_task_ran_again(killer.killed)
    assert_exact_run(cfg, unkilled_run(small_config, unkilled, 8), resumed_from=[])
