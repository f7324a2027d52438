"""Soak: the tiny config at pp=2 dp=2 trains while a chaos thread SIGKILLs a random training worker or a Ray Data
read task every 1-3 minutes; the run must end exactly as an uninterrupted one (not part of `make test`).

One JSON line:
  faults_injected        SIGKILLs delivered (worker_kills + read_task_kills)
  faults_survived        of those, the ones the run got past by itself (all of them when it finished)
  tokens_planned         max_steps x global_batch x seq_len
  tokens_trained         the tokens of the chaos run's last metrics row
  samples_sha_mismatches steps whose samples_sha differs from the uninterrupted run's, or that are missing or logged
                         more than once
  loss_mismatches        steps whose loss is not bitwise the uninterrupted run's
  final_loss_diff        |last loss - the uninterrupted run's last loss| (fp32 on CPU: 0)
Targets: every fault survived, tokens exact, 0 mismatches, diff 0.

max_steps is sized from a short calibration run so that the chaos run's steps take about --minutes (restarts add
to that); the first fault comes 1-3 minutes after the first step. A read task is killed only when Ray's state
API shows one running (a stream reads ahead, so that is not always the case); after 30 s without one the chaos
thread kills a training worker instead.
`--minutes N` (default 20), `--seed S`, `--min-gap-s` / `--max-gap-s` (default 60 / 180).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from common import TINY, emit, ensure_prepared, scratch_dir

from raylm.config import load_config
from raylm.ray_connect import connect_ray
from raylm.train.metrics import read_metrics

LAYOUT = [
    "parallel.pp=2",
    "parallel.dp=2",
    "parallel.zero_stage=1",
    "train.precision=fp32",
    "checkpoint.every_steps=10",
    "train.eval_every=50",
    "train.log_every=1",
    "fault.max_failures=1000",
]
CALIBRATION_STEPS = 12


def training_workers() -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])
    ]


def running_read_task() -> int | None:
    """The worker pid of a Ray Data read task that Ray's state API shows running, if any."""
    from ray.util.state import list_tasks

    running = list_tasks(filters=[("state", "=", "RUNNING")], raise_on_missing_output=False)
    return next((t.worker_pid for t in running if "_read_task" in t.name and t.worker_pid), None)


class Chaos(threading.Thread):
    """Every min_gap_s..max_gap_s seconds, SIGKILL a random training worker or a running read task."""

    def __init__(self, seed: int, min_gap_s: float, max_gap_s: float, metrics: Path):
        super().__init__(daemon=True)
        self.rng = random.Random(seed)  # noqa: S311 (a seeded fault schedule, not a secret)
        self.gaps, self.metrics = (min_gap_s, max_gap_s), metrics
        self.kills: list[dict] = []
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.metrics.exists() and not self.done.wait(1.0):
            pass  # the clock starts with the first step, not with Ray's start-up
        while not self.done.wait(self.rng.uniform(*self.gaps)):
            kind = self.rng.choice(("worker", "read_task"))
            pid = self._read_task_within(30.0) if kind == "read_task" else None
            if pid is None:
                kind, workers = "worker", training_workers()
                pid = self.rng.choice(workers) if workers else None
            if pid is None or self.done.is_set():
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(
                {
                    "kind": kind,
                    "pid": pid,
                    "rows": len(read_metrics(self.metrics.parent)),
                    "time": time.time(),
                }
            )
            print(f"soak: killed {kind} pid {pid}", file=sys.stderr, flush=True)

    def _read_task_within(self, seconds: float) -> int | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.done.is_set():
            pid = running_read_task()
            if pid is not None:
                return pid
            time.sleep(0.1)
        return None


def train_run(name: str, run_dir: Path, steps: int, extra: list[str] = ()) -> tuple[list[dict], float]:
    from raylm.train.driver import train

    cfg = load_config(
        TINY, [*LAYOUT, f"run.dir={run_dir}", f"run.name={name}", f"train.max_steps={steps}", *extra]
    )
    started = time.monotonic()
    train(cfg, overwrite=True)
    return read_metrics(run_dir / name), time.monotonic() - started


def compare(chaos: list[dict], reference: list[dict]) -> dict:
    by_step: dict[int, list[dict]] = {}
    for row in chaos:
        by_step.setdefault(row["step"], []).append(row)
    sha = loss = 0
    for ref in reference:
        rows = by_step.get(ref["step"], [])
        sha += len(rows) != 1 or rows[0].get("samples_sha") != ref["samples_sha"]
        loss += len(rows) != 1 or rows[0]["loss"] != ref["loss"]
    return {"samples_sha_mismatches": sha, "loss_mismatches": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gap-s", type=float, default=60.0)
    parser.add_argument("--max-gap-s", type=float, default=180.0)
    args = parser.parse_args()
    base = load_config(TINY, LAYOUT)
    ensure_prepared(base)
    connect_ray(dashboard=True)  # the chaos thread finds running read tasks through the state API behind it
    run_dir = scratch_dir("raylm-soak-")
    calibration, _ = train_run("calibration", run_dir, CALIBRATION_STEPS)
    step_s = statistics.median(r["step_s"] for r in calibration[CALIBRATION_STEPS // 2 :])
    steps = max(20, int(args.minutes * 60 / step_s))
    chaos = Chaos(args.seed, args.min_gap_s, args.max_gap_s, run_dir / "chaos" / "metrics.jsonl")
    try:
        failed = None
        chaos_rows, chaos_s = train_run("chaos", run_dir, steps)
    except Exception as exc:  # a fault the run did not survive: report it, do not hide the figures
        failed, chaos_rows, chaos_s = str(exc).splitlines()[0], read_metrics(run_dir / "chaos"), 0.0
    finally:
        chaos.done.set()
        chaos.join()
    reference, _ = train_run("reference", run_dir, steps)
    last = chaos_rows[-1] if chaos_rows else {}
    injected = len(chaos.kills)
    emit(
        benchmark="soak",
        minutes=args.minutes,
        steps=steps,
        chaos_wall_s=round(chaos_s, 1),
        faults_injected=injected,
        faults_survived=injected if failed is None else 0,
        worker_kills=sum(k["kind"] == "worker" for k in chaos.kills),
        read_task_kills=sum(k["kind"] == "read_task" for k in chaos.kills),
        resumed_from_rows=sum("resumed_from" in r for r in chaos_rows),
        tokens_planned=steps * base.train.global_batch * base.data.seq_len,
        tokens_trained=last.get("tokens", 0),
        **compare(chaos_rows, reference),
        final_loss_diff=abs(last["loss"] - reference[-1]["loss"]) if last else None,
        failed=failed,
    )


if __name__ == "__main__":
    main()
