"""Planner benchmark, side by side in one run: `raylm plan`'s predictions against measurements of the same layouts.

The CPU is calibrated first (raylm.plan.calibrate, measured again now, not read from the cache), then every layout
runs in fresh gloo ranks started by tests/distributed/dist_harness.run_world (no Ray), each rank with the torch
threads raylm would give it (the node's cores / its ranks). Figures (one JSON object per line):
  mem_pred_err_max        over the memory layouts, |predicted - measured| / measured, where measured is the largest
                          rank's peak RSS after one training step (VmHWM, as benchmarks/memory.py's measurement but not
                          inherited from the parent process) and
                          predicted is raylm plan's mem_per_rank_gb for that layout (the idle rank included)
  step_pred_err_max       over the speed layouts, |predicted - measured| / measured step time (the median of the
                          timed steps, the slowest rank's)
  tokens_per_s_rank_corr  Spearman's rank correlation of predicted and measured tokens/s over the speed layouts
and one line per layout (`kind` mem or step) with both values and the error.
No arguments: memory on benchmarks/memory.py's 24-layer d=1024 model under seven layouts (pp, tp, dp, ZeRO 0-3),
speed on benchmarks/train.py's d=256 6-layer model under six (pp, tp, dp, ZeRO, micro-batch); about ten minutes
and 6 GB. `--quick`: a 2-layer model, two layouts of each kind, three timed steps (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

from common import REPO_ROOT, emit, scratch_dir
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
# (pp, tp, dp, zero, micro_batch) of train.py's model, global batch 16: micro-batches 1 to 16 per DP rank
STEP_LAYOUTS = [
    (1, 1, 1, 0, 4),
    (1, 1, 1, 0, 1),
    (2, 1, 1, 0, 4),
    (2, 1, 1, 0, 1),
    (1, 2, 1, 0, 4),
    (1, 1, 2, 1, 4),
]
STEP_MODEL = {
    "data": {"vocab_size": 2048, "seq_len": 256},
    "model": {"n_layer": 6, "n_head": 8, "d_model": 256, "max_seq_len": 256},
    "train": {"precision": "fp32", "global_batch": 16},
}
QUICK_STEP_MODEL = ["model.n_layer=2", "model.d_model=128", "model.n_head=4", "data.seq_len=128"]
WARMUP_STEPS = 2


def threads_for(world_size: int) -> int:
    """raylm's torch threads per worker: the node's cores over the workers on it (raylm.train.worker)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def step_config(layout, quick: bool, data_dir: str):
    from raylm.config import resolve

    pp, tp, dp, zero, micro_batch = layout
    return resolve(
        {**STEP_MODEL, "parallel": {"micro_batch": micro_batch}},
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
    """Build the engine, train warm-up steps, then time `steps` more: this rank's median step seconds."""
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
    return {"rank": rank, "step_s": statistics.median(times)}


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


def measure_steps(
    layouts, quick: bool, hw, work: str, steps: int
) -> tuple[list[float], list[float], list[float]]:
    errors, pred_tps, meas_tps = [], [], []
    for layout in layouts:
        pp, tp, dp, zero, micro_batch = layout
        world = pp * tp * dp
        cfg = step_config(layout, quick, os.path.join(work, "no-data"))
        ranks = dist_harness.run_world(world, step_rank, layout, quick, work, steps)
        measured = max(r["step_s"] for r in ranks)
        pred = predicted(cfg, hw, world)
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
            predicted_s=round(pred.time.total, 4),
            measured_s=round(measured, 4),
            predicted_tokens_per_s=round(pred.tokens_per_s),
            measured_tokens_per_s=round(tokens / measured),
            bubble=round(pred.time.bubble, 3),
            err=round(err, 3),
        )
    return errors, pred_tps, meas_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, two layouts of each kind")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per speed layout (after 2 warm-up)")
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
    step_errors, pred_tps, meas_tps = measure_steps(step_layouts, args.quick, hw, work, steps)
    emit(mem_pred_err_max=round(max(mem_errors), 3), target=0.15, quick=args.quick)
    emit(step_pred_err_max=round(max(step_errors), 3), target=0.25, quick=args.quick)
    emit(tokens_per_s_rank_corr=round(spearman(pred_tps, meas_tps), 3), target=0.8, quick=args.quick)


if __name__ == "__main__":
    main()
