"""Planner benchmark, side by side in one run: `raylm plan`'s predictions against measurements of the same layouts.

The CPU is calibrated first (raylm.plan.calibrate, measured again now, not read from the cache), then every layout
runs in fresh gloo ranks started by tests/distributed/dist_harness.run_world (no Ray), each rank with the torch
threads raylm would give it (the node's cores / its ranks). Figures (one JSON object per line):
  mem_pred_err_max        over the memory layouts, |predicted - measured| / measured, where measured is the largest
                          rank's peak RSS after one training step (VmHWM, as benchmarks/memory.py's measurement but not
                          inherited from the parent process) and
                          predicted is raylm plan's mem_per_rank_gb for that layout (the idle rank included)
  step_pred_err_max       over the speed layouts, |predicted - measured| / measured step time, where measured is
                          the median over every timed step of the layout's passes (each step's slowest rank)
  tokens_per_s_rank_corr  Spearman's rank correlation of predicted and measured tokens/s over the speed layouts
and one line per layout (`kind` mem or step) with both values and the error; a step line also gives the range
of its timed steps and `other_busy_cores`, the most cores other processes kept busy during one of its passes (a
figure measured beside a busy neighbour says so).
No arguments: memory on benchmarks/memory.py's 24-layer d=1024 model under seven layouts (pp, tp, dp, ZeRO 0-3),
speed on benchmarks/train.py's d=256 6-layer model under six (pp, tp, dp, ZeRO-1, micro-batch, activation
checkpointing), each run twice, in alternating order, with 2 warm-up and 5 timed steps a run; about seven minutes
and 7 GB. `--quick`: a 2-layer model, two layouts of each kind, one pass of three timed steps (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

from common import REPO_ROOT, OtherLoad, emit, scratch_dir
from memory import BASE, DRY_MODEL, layout_config, one_step

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

MEM_LAYOUTS = [
    (1, 1, 1, 0),
    (2, 1, 1, 1),
    (4, 1, 1, 1),
    (1, 2, 1, 0),
    (1, 1, 2, 1),
    (1, 1, 2, 2),
    (1, 1, 2, 3),
]
# (pp, tp, dp, zero, micro_batch, activation checkpointing) of train.py's model, global batch 16: chosen so their
# predicted tokens/s lie apart (about 3,300 down to 1,300 here) and a rank correlation over them is not noise
STEP_LAYOUTS = [
    (1, 1, 2, 1, 4, False),  # DP with ZeRO-1
    (2, 1, 1, 0, 1, False),  # a pipeline of 16 micro-batches: a small bubble
    (1, 2, 1, 0, 4, False),  # TP: 7 all-reduces per block and micro-batch
    (2, 1, 1, 0, 8, False),  # 2 micro-batches: a third of the step is bubble
    (2, 1, 1, 0, 16, False),  # 1 micro-batch: half of it
    (2, 1, 1, 0, 16, True),  # and every block recomputed
]
STEP_MODEL = {
    "data": {"vocab_size": 2048, "seq_len": 256},
    "model": {"n_layer": 6, "n_head": 8, "d_model": 256, "max_seq_len": 256},
    "train": {"precision": "fp32", "global_batch": 16},
}
QUICK_STEP_MODEL = ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "data.seq_len=128"]
WARMUP_STEPS = 2
PASSES = 2  # every speed layout is measured this often, the passes in alternating order


def threads_for(world_size: int) -> int:
    """raylm's torch threads per worker: the node's cores over the workers on it (raylm.train.worker)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def step_config(layout, quick: bool, data_dir: str):
    from raylm.config import resolve

    pp, tp, dp, zero, micro_batch, checkpointing = layout
    return resolve(
        {**STEP_MODEL, "parallel": {"micro_batch": micro_batch, "activation_checkpointing": checkpointing}},
        [
            f"parallel.pp={pp}",
            f"parallel.tp={tp}",
            f"parallel.dp={dp}",
            f"parallel.zero_stage={zero}",
            f"data.out_dir={data_dir}",
            *(QUICK_STEP_MODEL if quick else []),
        ],
    )


def quiet_build(cfg):
    """build_engine, with DeepSpeed's printout of the pipeline's stages kept off stdout (the JSON lines)."""
    from raylm.parallel.engine import build_engine

    with contextlib.redirect_stdout(io.StringIO()):
        return build_engine(cfg)


def mem_rank(rank: int, world_size: int, layout, model: list[str], work: str) -> dict:
    """Build the engine, train one step, read this rank's peak RSS."""
    import torch

    from raylm.plan.calibrate import peak_rss_bytes

    torch.set_num_threads(threads_for(world_size))
    cfg = layout_config(layout, model, os.path.join(work, "no-data"))
    engine = quiet_build(cfg)
    one_step(engine, cfg)
    return {"rank": rank, "peak_rss": peak_rss_bytes()}


def step_rank(rank: int, world_size: int, layout, quick: bool, work: str, steps: int) -> dict:
    """Build the engine, train warm-up steps, then time `steps` more: this rank's seconds of each."""
    import torch

    torch.set_num_threads(threads_for(world_size))
    cfg = step_config(layout, quick, os.path.join(work, "no-data"))
    engine = quiet_build(cfg)
    for _ in range(WARMUP_STEPS):
        one_step(engine, cfg)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step(engine, cfg)
        times.append(time.perf_counter() - start)
    return {"rank": rank, "step_s": times}


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def predicted(cfg, hw, world: int):
    from raylm.plan.predict import predict

    pred = predict(cfg, hw, gpus_per_node=world)
    if pred.memory is None or pred.time is None:
        raise SystemExit(f"the planner refuses a benchmark layout: {pred.why}")
    return pred


def measure_memory(layouts, model: list[str], hw, work: str) -> list[float]:
    errors = []
    for layout in layouts:
        pp, tp, dp, zero = layout
        world = pp * tp * dp
        ranks = dist_harness.run_world(world, mem_rank, layout, model, work)
        measured = max(r["peak_rss"] for r in ranks)
        pred = predicted(layout_config(layout, model, os.path.join(work, "no-data")), hw, world)
        assert pred.memory is not None
        err = relative_error(pred.memory.total, measured)
        errors.append(err)
        emit(
            kind="mem",
            pp=pp,
            tp=tp,
            dp=dp,
            zero=zero,
            predicted_gb=round(pred.memory.total / 1e9, 3),
            measured_gb=round(measured / 1e9, 3),
            per_rank_gb=[round(r["peak_rss"] / 1e9, 3) for r in ranks],
            err=round(err, 3),
        )
    return errors


def time_layout(layout, quick: bool, work: str, steps: int) -> tuple[list[float], float | None]:
    """One world of the layout: each timed step's seconds (its slowest rank's), and the cores other processes
    kept busy meanwhile."""
    pp, tp, dp = layout[:3]
    with OtherLoad() as load:
        ranks = dist_harness.run_world(pp * tp * dp, step_rank, layout, quick, work, steps)
    return [max(step) for step in zip(*(r["step_s"] for r in ranks), strict=True)], load.cores


def measure_steps(
    layouts, quick: bool, hw, work: str, steps: int, passes: int
) -> tuple[list[float], list[float], list[float]]:
    """Every layout `passes` times, forward then backward through the list (a slow spell of the machine falls on
    different layouts), then per layout the median of all its timed steps against the prediction."""
    times: dict[tuple, list[float]] = {layout: [] for layout in layouts}
    other: dict[tuple, list[float]] = {layout: [] for layout in layouts}
    for n in range(passes):
        for layout in layouts if n % 2 == 0 else layouts[::-1]:
            step_s, cores = time_layout(layout, quick, work, steps)
            times[layout] += step_s
            other[layout] += [] if cores is None else [cores]
    errors, pred_tps, meas_tps = [], [], []
    for layout in layouts:
        pp, tp, dp, zero, micro_batch, checkpointing = layout
        cfg = step_config(layout, quick, os.path.join(work, "no-data"))
        measured = statistics.median(times[layout])
        pred = predicted(cfg, hw, pp * tp * dp)
        assert pred.time is not None
        err = relative_error(pred.time.total, measured)
        tokens = cfg.train.global_batch * cfg.data.seq_len
        errors.append(err)
        pred_tps.append(pred.tokens_per_s)
        meas_tps.append(tokens / measured)
        emit(
            kind="step",
            pp=pp,
            tp=tp,
            dp=dp,
            zero=zero,
            micro_batch=micro_batch,
            checkpointing=checkpointing,
            predicted_s=round(pred.time.total, 4),
            measured_s=round(measured, 4),
            measured_s_range=[round(min(times[layout]), 4), round(max(times[layout]), 4)],
            predicted_tokens_per_s=round(pred.tokens_per_s),
            measured_tokens_per_s=round(tokens / measured),
            bubble=round(pred.time.bubble, 3),
            err=round(err, 3),
            other_busy_cores=round(max(other[layout]), 2) if other[layout] else None,
        )
    return errors, pred_tps, meas_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, two layouts of each kind")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per speed layout and pass (after 2 warm-up)"
    )
    parser.add_argument("--passes", type=int, default=PASSES, help="passes over the speed layouts")
    args = parser.parse_args()
    from raylm.plan.calibrate import cpu_hardware

    start = time.perf_counter()
    hw = cpu_hardware(recalibrate=True)
    emit(
        calibration_s=round(time.perf_counter() - start, 1),
        matmul_fp32_gflops=round(hw.peak("fp32") / 1e9, 1),
        allreduce_gb_s=round(hw.intra_bw / 1e9, 2),
        send_gb_s=round(hw.p2p_bw / 1e9, 2),
        sync_wait_ms=round(hw.sync_wait_s * 1e3, 3),
        idle_rank_gb=round(hw.framework_bytes / 1e9, 3),
        cores=hw.cores_per_node,
    )
    mem_layouts = [MEM_LAYOUTS[0], MEM_LAYOUTS[-1]] if args.quick else MEM_LAYOUTS
    step_layouts = [STEP_LAYOUTS[0], STEP_LAYOUTS[2]] if args.quick else STEP_LAYOUTS
    model = DRY_MODEL if args.quick else [f"model.n_layer={BASE['model']['n_layer']}"]
    steps = 3 if args.quick else args.steps
    dist_harness.TIMEOUT_S = 900  # a 300M-parameter step on one thread per rank
    dist_harness.START_METHOD = "spawn"  # fresh processes, as the calibration measures a rank's fixed cost
    work = str(scratch_dir("raylm-plan-bench-"))
    mem_errors = measure_memory(mem_layouts, model, hw, work)
    passes = 1 if args.quick else args.passes
    step_errors, pred_tps, meas_tps = measure_steps(step_layouts, args.quick, hw, work, steps, passes)
    emit(mem_pred_err_max=round(max(mem_errors), 3), target=0.15, quick=args.quick)
    emit(step_pred_err_max=round(max(step_errors), 3), target=0.25, quick=args.quick)
    emit(tokens_per_s_rank_corr=round(spearman(pred_tps, meas_tps), 3), target=0.8, quick=args.quick)


if __name__ == "__main__":
    main()
