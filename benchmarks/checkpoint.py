"""Checkpoint benchmark, side by side in one run: the training time a save costs, in the loop and in the background.

One gloo rank (tests/distributed/dist_harness.run_world, no Ray) builds the (1,1,1,0) engine of benchmarks/memory.py's
~300M-parameter model (d=1024, 24 layers, seq 128, fp32) with the torch threads a one-worker run takes on this
machine (all its cores; --threads), and, per round, times: a save in the loop (raylm.checkpoint.save_checkpoint,
what checkpoint.async=false does); and a background save (raylm.checkpoint.background, checkpoint.async=true)
with plain steps before and after it and training going on while it writes, polled each step as the loop does,
until it commits. Before the rounds, one background save (waited for) maps the snapshot's host buffers, as a run's
first save does; the rounds measure the saves after it, which reuse them.
Figures (one JSON object per line; times are medians over the rounds):
  sync_save_s           the save in the loop: every second of it is training time lost
  async_blocking_s      the background save's start: the host snapshot of weights and AdamW moments
                        (first_blocking_s: the first save's, which maps the buffers)
  async_slowdown_s      what the steps trained while the background save wrote lost to it: the sum over every
                        step from its start to the poll that found it committed of (step time - plain step time),
                        the plain step time being the median of the plain steps just before and after it
  async_save_s          the background save from its start to its commit (steps_during: the steps it spanned)
  ckpt_blocking_frac    (async_blocking_s + async_slowdown_s) / sync_save_s: training time lost per save with a
                        background save over a save in the loop (target <= 0.15)
  async_extra_host_mb   host memory the background saves hold: RSS after the first one's start over RSS before
                        any save (async_buffers_mb: the bytes of the snapshot buffers, kept between saves), and
                        async_extra_vs_state: that over the state's fp32 bytes (12 per parameter)
--compare-nice adds, per round, a background save whose writer thread runs at nice 19 (checkpoint.writer_nice;
ckpt_blocking_frac_nice19): what leaving the cores to the step first saves.
No arguments: the 300M model, 2 rounds. `--layers 12` halves it; `--dry`: a tiny model, 1 round, to check the script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import REPO_ROOT, emit, scratch_dir
from memory import DRY_MODEL, LAYOUTS, layout_config, one_step

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

STATE_BYTES_PER_PARAM = 12  # fp32 weights and AdamW's two fp32 moments: what a checkpoint holds
PLAIN_STEPS = 3  # plain steps timed before and after each background save
NICE = 19  # --compare-nice: the writer thread's nice value


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


def async_round(engine, cfg, saver, folder: Path, step: int, plain_steps: int = PLAIN_STEPS) -> dict:
    """A background save with training going on: its blocking start, the steps from it to its commit and their
    time over plain steps (timed before and after it), and the RSS its start left."""
    from raylm.checkpoint import capture_rng

    before = plain_step_times(engine, cfg, plain_steps)
    start = time.perf_counter()
    saver.start(engine, folder, step, {"step": step}, capture_rng(), lambda phase: None, lambda path: None)
    blocking_s = time.perf_counter() - start
    rss = rss_bytes()
    during, committed = [], None
    while committed is None:  # each step and its poll, as the training loop runs them
        began = time.perf_counter()
        one_step(engine, cfg)
        committed = saver.poll()
        during.append(time.perf_counter() - began)
    save_s = time.perf_counter() - start
    shutil.rmtree(committed)
    plain = before + plain_step_times(engine, cfg, plain_steps)
    plain_s = statistics.median(plain) if plain else 0.0
    return {
        "blocking_s": round(blocking_s, 3),
        "slowdown_s": round(sum(t - plain_s for t in during), 3),
        "save_s": round(save_s, 3),
        "steps": len(during),
        "plain_s": round(plain_s, 3),
        "during_s": [round(t, 3) for t in during],
        "rss": rss,
    }


def bench_rank(
    rank: int, world_size: int, model: list[str], work: str, rounds: int, threads: int, compare: bool
) -> dict:
    import torch

    from raylm.checkpoint.background import BackgroundSaver
    from raylm.parallel.engine import build_engine

    torch.set_num_threads(threads)
    cfg = layout_config(LAYOUTS[0], model, str(Path(work) / "no-data"))
    engine = build_engine(cfg)
    params = sum(p.numel() for p in {id(p): p for p in engine.layers.params.values()}.values())
    one_step(engine, cfg)  # warm-up
    folder = Path(work) / "checkpoints"
    rss_before = rss_bytes()
    saver = BackgroundSaver(cfg, engine.device)
    first = async_round(engine, cfg, saver, folder, 1, plain_steps=0)  # maps the snapshot's buffers
    niced = BackgroundSaver(replace(cfg, checkpoint=replace(cfg.checkpoint, writer_nice=NICE)), engine.device)
    niced.host = saver.host  # one save at a time: the two share the buffers
    sync_s, background, nice = [], [], []
    for index in range(rounds):
        sync_s.append(sync_round(engine, cfg, folder, 3 * index + 2))
        background.append(async_round(engine, cfg, saver, folder, 3 * index + 3))
        if compare:
            nice.append(async_round(engine, cfg, niced, folder, 3 * index + 4))
    saver.close()
    niced.close()
    return {
        "params": params,
        "sync_s": sync_s,
        "async": background,
        "nice": nice,
        "first_blocking_s": first["blocking_s"],
        "extra": first["rss"] - rss_before,
        "buffers": saver.host.nbytes(),
    }


def blocking_frac(runs: list[dict], sync_s: float) -> float:
    lost_s = statistics.median(r["blocking_s"] + r["slowdown_s"] for r in runs)
    return round(lost_s / sync_s, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny model, one round")
    parser.add_argument("--layers", type=int, default=24, help="transformer blocks")
    parser.add_argument("--rounds", type=int, default=2, help="sync and async saves, alternating")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (a one-worker run's: every core)",
    )
    parser.add_argument("--compare-nice", action="store_true", help="also a background writer at nice 19")
    args = parser.parse_args()
    model = DRY_MODEL if args.dry else [f"model.n_layer={args.layers}"]
    rounds = 1 if args.dry else args.rounds
    dist_harness.TIMEOUT_S = 1800  # a 300M-parameter model's steps and saves on 2 cores
    dist_harness.START_METHOD = "spawn"
    work = scratch_dir("raylm-checkpoint-bench-")
    try:
        out = dist_harness.run_world(
            1, bench_rank, model, str(work), rounds, args.threads, args.compare_nice
        )[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = out["async"]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    sync_s = statistics.median(out["sync_s"])
    emit(
        params=out["params"],
        rounds=rounds,
        threads=args.threads,
        dry=args.dry,
        sync_save_s=round(sync_s, 3),
        sync_runs=[round(s, 3) for s in out["sync_s"]],
    )
    emit(
        async_blocking_s=round(median("blocking_s"), 3),
        first_blocking_s=round(out["first_blocking_s"], 3),
        async_slowdown_s=round(median("slowdown_s"), 3),
        async_save_s=round(median("save_s"), 3),
        steps_during=median("steps"),
        plain_step_s=round(median("plain_s"), 3),
        async_runs=[{k: v for k, v in r.items() if k != "rss"} for r in runs],
    )
    emit(ckpt_blocking_frac=blocking_frac(runs, sync_s), target=0.15)
    if out["nice"]:
        emit(
            ckpt_blocking_frac_nice19=blocking_frac(out["nice"], sync_s),
            nice19_runs=[{k: v for k, v in r.items() if k != "rss"} for r in out["nice"]],
        )
    extra = out["extra"]
    emit(
        async_extra_host_mb=round(extra / 2**20),
        async_buffers_mb=round(out["buffers"] / 2**20),
        async_extra_vs_state=round(extra / (STATE_BYTES_PER_PARAM * out["params"]), 3),
    )


if __name__ == "__main__":
    main()
