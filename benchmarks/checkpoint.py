"""Checkpoint benchmark, side by side in one run: the training time a save costs, in the loop and in the background.

One gloo rank (tests/distributed/dist_harness.run_world, no Ray) builds the (1,1,1,0) engine of benchmarks/memory.py's
~300M-parameter model (d=1024, 24 layers, seq 128, fp32) and, per round, times: plain steps; a save in the loop
(raylm.checkpoint.save_checkpoint, what checkpoint.async=false does); and steps trained while a background save
(raylm.checkpoint.background, checkpoint.async=true) writes, polled each step as the loop does, until it commits.
Figures (one JSON object per line; times are medians over the rounds):
  sync_save_s           the save in the loop: every second of it is training time lost
  async_blocking_s      the background save's start: the host snapshot of weights and AdamW moments
  async_slowdown_s      what the steps trained during the background write lost to it (their time over as many
                        plain steps, at the median time of the plain steps just before and after it)
  async_save_s          the background save from its start to its commit (steps_during: the steps it spanned)
  ckpt_blocking_frac    (async_blocking_s + async_slowdown_s) / sync_save_s: training time lost per save with a
                        background save over a save in the loop (target <= 0.15)
  async_extra_host_mb   host memory the snapshot holds while it is written (RSS after the start over before it),
                        and async_extra_vs_state: that over the state's fp32 bytes (12 per parameter)
No arguments: the 300M model, 2 rounds. `--layers 12` halves it; `--dry`: a tiny model, 1 round, to check the script.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import REPO_ROOT, emit, scratch_dir
from memory import DRY_MODEL, LAYOUTS, layout_config, one_step

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

STATE_BYTES_PER_PARAM = 12  # fp32 weights and AdamW's two fp32 moments: what a checkpoint holds
PLAIN_STEPS = 4  # plain steps timed before and after each background save


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def plain_step_times(engine, cfg, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step(engine, cfg)
        times.append(time.perf_counter() - start)
    return times


def sync_round(engine, cfg, folder: Path, step: int) -> float:
    """Seconds of one save in the loop."""
    from raylm.checkpoint import capture_rng, save_checkpoint

    start = time.perf_counter()
    path = save_checkpoint(engine, cfg, folder, step, {"step": step}, capture_rng())
    took = time.perf_counter() - start
    shutil.rmtree(path)
    return took


def async_round(engine, cfg, folder: Path, step: int) -> dict:
    """A background save with training going on: its blocking start, the steps it spanned and their time, the
    extra host memory, and the plain step time around it."""
    from raylm.checkpoint import capture_rng
    from raylm.checkpoint.background import BackgroundSaver

    saver = BackgroundSaver(cfg, engine.device)
    before = plain_step_times(engine, cfg, PLAIN_STEPS)
    rss_before = rss_bytes()
    start = time.perf_counter()
    saver.start(engine, folder, step, {"step": step}, capture_rng(), lambda phase: None, lambda path: None)
    blocking_s = time.perf_counter() - start
    extra = rss_bytes() - rss_before
    steps, committed = 0, None
    while committed is None:
        one_step(engine, cfg)
        steps += 1
        committed = saver.poll()
    save_s = time.perf_counter() - start
    saver.close()
    shutil.rmtree(committed)
    plain_s = statistics.median(before + plain_step_times(engine, cfg, PLAIN_STEPS))  # steps around it
    slowdown_s = save_s - blocking_s - steps * plain_s
    return {
        "blocking_s": blocking_s,
        "slowdown_s": slowdown_s,
        "save_s": save_s,
        "steps": steps,
        "extra": extra,
    }


def bench_rank(rank: int, world_size: int, model: list[str], work: str, rounds: int) -> dict:
    from raylm.parallel.engine import build_engine

    cfg = layout_config(LAYOUTS[0], model, str(Path(work) / "no-data"))
    engine = build_engine(cfg)
    params = sum(p.numel() for p in {id(p): p for p in engine.layers.params.values()}.values())
    one_step(engine, cfg)  # warm-up
    folder = Path(work) / "checkpoints"
    sync_s, background = [], []
    for index in range(rounds):
        sync_s.append(sync_round(engine, cfg, folder, 2 * index + 1))
        background.append(async_round(engine, cfg, folder, 2 * index + 2))
    return {"params": params, "sync_s": sync_s, "async": background}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny model, one round")
    parser.add_argument("--layers", type=int, default=24, help="transformer blocks")
    parser.add_argument("--rounds", type=int, default=2, help="sync and async saves, alternating")
    args = parser.parse_args()
    model = DRY_MODEL if args.dry else [f"model.n_layer={args.layers}"]
    rounds = 1 if args.dry else args.rounds
    dist_harness.TIMEOUT_S = 1800  # a 300M-parameter model's steps and saves on one thread
    dist_harness.START_METHOD = "spawn"
    work = scratch_dir("raylm-checkpoint-bench-")
    try:
        out = dist_harness.run_world(1, bench_rank, model, str(work), rounds)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = out["async"]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    sync_s = statistics.median(out["sync_s"])
    lost_s = median("blocking_s") + median("slowdown_s")
    extra = median("extra")
    emit(
        params=out["params"],
        rounds=rounds,
        dry=args.dry,
        sync_save_s=round(sync_s, 3),
        sync_runs=out["sync_s"],
    )
    emit(
        async_blocking_s=round(median("blocking_s"), 3),
        async_slowdown_s=round(median("slowdown_s"), 3),
        async_save_s=round(median("save_s"), 3),
        steps_during=median("steps"),
        async_runs=runs,
    )
    emit(ckpt_blocking_frac=round(lost_s / sync_s, 3), target=0.15)
    emit(
        async_extra_host_mb=round(extra / 2**20),
        async_extra_vs_state=round(extra / (STATE_BYTES_PER_PARAM * out["params"]), 3),
    )


if __name__ == "__main__":
    main()
