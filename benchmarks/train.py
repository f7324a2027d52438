"""Training benchmark, side by side in one run: raylm on Ray Train against a plain PyTorch loop, and the pp bubble.

Figures (one JSON object per line):
  raylm_vs_plain_ratio  raylm tokens/s (1 worker, pp=tp=dp=1) / plain single-process loop, same model+batch+dtype
  raylm_vs_plain_in_ray_ratio  raylm tokens/s / the same plain loop run inside one Ray Train worker (a fresh
                        local Ray, the worker shaped as raylm shapes its own, the same torch threads), in the same
                        run: Ray's own cost taken out of the yardstick, so what is left is raylm's
  matmul_peak_frac      raylm's achieved model FLOP/s / a square fp32 matmul's FLOP/s measured here
                        (plain_loop_peak_frac: the plain loop's, a ceiling for raylm's)
  startup_s             `raylm train` launch to the first step's batch in hand (rank 0's startup.jsonl), with
                        its phases in seconds: driver_s (the CLI process's imports and config), ray_start_s,
                        run_setup_s (run folder, preflight, the TorchTrainer), worker_start_s (Ray Train's
                        controller, worker group and process group), imports_s (torch, DeepSpeed, raylm in the
                        worker), engine_s (the DeepSpeed engine and weights) and first_batch_s (the data stream's
                        first batch); `--startup-only` runs only this, a 2-step run
  raylm_vs_plain_ratio_one_thread  the ratio with one torch thread each side (no target): raylm's own
                        overhead once Ray's processes have a core of their own
  raylm_vs_plain_in_ray_ratio_one_thread  the same one-thread raylm run against the plain loop in a Ray Train
                        worker with one thread (no target; beside the two-thread figure, which Ray's background
                        processes distort on 2 cores)
  bubble_gap_pts        pp=2 bubble from step times, 1 - (pp=1 step / p) / (pp=2 step), minus (p-1)/(m+p-1), in
                        points; both stages and the pp=1 reference on one thread each
  bubble_wait_gap_pts   the bubble stage 0 measures itself (pipe_wait_frac: its sends, receives and tied-weight
                        reduce) minus the formula: the schedule alone, without the per-stage compute slowdown
                        that two stages sharing the cores with Ray's own processes add to bubble_gap_pts
                        (stage_compute_vs_pp1; per_core_speed_all_busy is the plain loop's tokens/s per core
                        with every core busy against one core alone, a slowdown no pipeline can avoid)
The plain loop runs on both sides of the raylm run and its per-step rates are pooled (a median against raylm's
median, with drift during the raylm run bracketed); the matmul peak is the best reading of either side.
`--steps N` sets the optimizer steps per measurement (default 30).

Measured on 2 shared cores (other jobs running), ratio and one-thread figures from one script per branch, run back
to back: raylm_vs_plain_in_ray_ratio 0.964 before skipping DeepSpeed's all-reduce over a single DP rank, 1.006
after (raylm 3440 -> 3747 tokens/s; the plain loop in Ray 3567 and 3725); with one thread 0.964 and 0.925, raylm
2277 and 2249 tokens/s, i.e. unchanged within this machine's noise. In one gloo process without Ray, one thread,
raylm's train_batch runs at 0.985 of the plain loop after the change.
The whole benchmark on an otherwise idle machine: raylm_vs_plain_in_ray_ratio 0.861 (one thread 0.991) before one
process group per single rank and `raylm train` without the dashboard (docs/ray-facts.md 4 and 9), 0.970 after
(raylm 3395 tokens/s, the plain loop in Ray 3500; one thread 1.018).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise

import torch
from common import TINY, emit, ensure_prepared, scratch_dir, steady

from raylm.config import Config, load_config
from raylm.config.derived import micro_batches_for, padded_vocab
from raylm.model.facts import flops_per_token, layer_costs
from raylm.model.gpt import GPT, init_full_weights
from raylm.plan.peaks import measure_matmul_peak
from raylm.train.metrics import read_metrics
from raylm.train.startup import read_startups

# The plain-loop yardstick of docs/ray-facts.md 3 (d=256, 6 layers, T=256, batch 8) with tiny.yaml's 2k vocabulary:
# 5.3M parameters, so the blocks, not the cross-entropy, dominate.
MODEL = [
    "model.d_model=256",
    "model.n_layer=6",
    "model.n_head=8",
    "data.seq_len=256",
    "model.max_seq_len=256",
    "train.global_batch=8",
    "parallel.micro_batch=8",
    "train.precision=fp32",
]
QUIET = [
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.report_every=1000",
    "checkpoint.every_steps=0",
    "schedule.lr.kind=constant",
    "schedule.lr.warmup_steps=0",
    "parallel.zero_stage=0",
]

# The bubble formula assumes equal stages. With d=128 the LM head costs about one block (6·V·d against
# 6·(block weights) + 12·d·T FLOPs per token), so 7 blocks split [embedding, 4 blocks] | [3 blocks, head].
PIPELINE = [
    "model.d_model=128",
    "model.n_head=4",
    "model.n_layer=7",
    "train.global_batch=16",
    "parallel.micro_batch=2",
    "train.torch_threads=1",
]


def plain_step_rates(cfg: Config, steps: int, threads: int) -> list[float]:
    """A plain single-process loop (nanoGPT style) on the same model, batch and dtype, the yardstick: its
    per-step tokens/s after the first third (warm-up)."""
    torch.set_num_threads(threads)
    vocab = padded_vocab(cfg.data.vocab_size)
    model = GPT(cfg.model, vocab)
    model.load_state_dict(init_full_weights(cfg.model, vocab, cfg.run.seed))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2)
    )
    gen = torch.Generator().manual_seed(0)
    batch, seq_len = cfg.train.global_batch, cfg.data.seq_len
    rates = []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.data.vocab_size, (batch, seq_len + 1), generator=gen)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(batch * seq_len / (time.perf_counter() - start))
    return rates[steps // 3 :]


def raylm_run(name: str, overrides: list[str], work) -> tuple[list[dict], float]:
    """`raylm train` as a user runs it (a fresh process and a fresh local Ray); returns rows and launch time."""
    launched = time.time()
    cmd = [
        sys.executable,
        "-m",
        "raylm.cli",
        "train",
        str(TINY),
        *overrides,
        f"run.dir={work}",
        f"run.name={name}",
        "--overwrite",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return read_metrics(work / name), launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    parser.add_argument("--startup-only", action="store_true", help="only startup_s, from a 2-step run")
    args = parser.parse_args()
    work = scratch_dir("raylm-train-bench-")
    base = MODEL + QUIET + [f"train.max_steps={args.steps}"]
    cfg = load_config(TINY, base + ["parallel.pp=1"])
    ensure_prepared(cfg)
    if args.startup_only:
        _, launched = raylm_run("startup", MODEL + QUIET + ["train.max_steps=2", "parallel.pp=1"], work)
        emit(**startup_figures(work / "startup", launched))
        return
    skip = max(2, args.steps // 3)
    cores = os.cpu_count() or 1
    plain = ratio_figures(cfg, base, args.steps, skip, work, cores)
    plain_one = one_thread_ratio(cfg, base, args.steps, skip, work)
    bubble_figures(base, skip, work, per_core_all_busy=plain / (cores * plain_one))


def ratio_figures(cfg: Config, base: list[str], steps: int, skip: int, work, cores: int) -> float:
    """raylm_vs_plain_ratio, matmul_peak_frac and startup_s from one raylm run between two plain-loop runs;
    returns the plain loop's tokens/s."""
    plain_before, peak_before = plain_step_rates(cfg, steps, cores), measure_matmul_peak(seconds=1.0)
    rows, launched = raylm_run("ratio", base + ["parallel.pp=1"], work)
    plain_after, peak_after = plain_step_rates(cfg, steps, cores), measure_matmul_peak(seconds=1.0)
    plain, peak = statistics.median(plain_before + plain_after), max(peak_before, peak_after)
    ours = steady(rows, "tokens_per_s", skip)
    model_flops = flops_per_token(cfg.model, padded_vocab(cfg.data.vocab_size), cfg.data.seq_len)
    emit(
        raylm_vs_plain_ratio=round(ours / plain, 3),
        raylm_tokens_per_s=round(ours),
        plain_tokens_per_s=round(plain),
        plain_before_after=[round(statistics.median(plain_before)), round(statistics.median(plain_after))],
        target=0.90,
    )
    emit(
        matmul_peak_frac=round(ours * model_flops / peak, 3),
        achieved_gflops=round(ours * model_flops / 1e9, 1),
        plain_loop_peak_frac=round(plain * model_flops / peak, 3),
        matmul_peak_gflops=round(peak / 1e9, 1),
        peak_before_after=[round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
        target=0.75,
    )
    emit(**startup_figures(work / "ratio", launched))
    in_ray = statistics.median(plain_in_ray_rates(cfg, steps, cores, work))
    emit(
        raylm_vs_plain_in_ray_ratio=round(ours / in_ray, 3),
        raylm_tokens_per_s=round(ours),
        plain_in_ray_tokens_per_s=round(in_ray),
        plain_in_ray_vs_plain=round(in_ray / plain, 3),
        threads=cores,
        target=0.97,
    )
    return plain


def startup_figures(run_dir, launched: float) -> dict:
    """startup_s and its phases (raylm.train.startup) from the run's startup.jsonl and its launch time."""
    (first,) = read_startups(run_dir)  # one start: no worker group restarted
    phases = {name: round(seconds, 2) for name, seconds in first["phases"].items()}
    return {"startup_s": round(first["marks"]["first_batch"] - launched, 2), **phases, "target": 8.0}


def plain_in_ray_rates(cfg: Config, steps: int, threads: int, work) -> list[float]:
    """plain_step_rates inside one Ray Train worker of a fresh local Ray, resourced as `raylm train` resources
    its own workers (raylm.train.driver.scaling_for)."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from raylm.config import to_dict
    from raylm.train.driver import scaling_for

    # workers import this file by module name unless it runs as __main__ (then Ray ships the function by value)
    here = os.path.dirname(os.path.abspath(__file__))
    pythonpath = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ray.init(
        include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}
    )
    try:
        scaling, _ = scaling_for(cfg, dict(ray.cluster_resources()))
        out = os.path.join(str(work), "plain-in-ray-rates.json")
        loop_config = {"config": to_dict(cfg), "steps": steps, "threads": threads, "out": out}
        TorchTrainer(
            plain_worker,
            scaling_config=scaling,
            train_loop_config=loop_config,
            run_config=RunConfig(storage_path=str(work), name="plain-in-ray"),
        ).fit()
        with open(out) as f:
            return json.load(f)
    finally:
        ray.shutdown()


def plain_worker(loop_config: dict) -> None:
    """The Ray Train worker of plain_in_ray_rates: the plain loop, its rates written to a file (one local node;
    Ray Train v2 keeps reported metrics only with checkpoints)."""
    from raylm.config import resolve

    rates = plain_step_rates(resolve(loop_config["config"]), loop_config["steps"], loop_config["threads"])
    with open(loop_config["out"], "w") as f:
        json.dump(rates, f)


def one_thread_ratio(cfg: Config, base: list[str], steps: int, skip: int, work) -> float:
    """The tokens/s ratio again with one torch thread on each side: Ray's own processes (controller, actors,
    dashboard, each waking 100 times a second) then run on a spare core instead of stalling the lock-stepped
    intra-op threads of the other core, so this figure is raylm's own overhead. Returns the plain tokens/s."""
    before = plain_step_rates(cfg, steps, 1)
    rows, _ = raylm_run("ratio-one-thread", base + ["parallel.pp=1", "train.torch_threads=1"], work)
    plain = statistics.median(before + plain_step_rates(cfg, steps, 1))
    ours = steady(rows, "tokens_per_s", skip)
    emit(
        raylm_vs_plain_ratio_one_thread=round(ours / plain, 3),
        raylm_tokens_per_s=round(ours),
        plain_tokens_per_s=round(plain),
    )
    in_ray = statistics.median(plain_in_ray_rates(cfg, steps, 1, work))
    emit(
        raylm_vs_plain_in_ray_ratio_one_thread=round(ours / in_ray, 3),
        raylm_tokens_per_s=round(ours),
        plain_in_ray_tokens_per_s=round(in_ray),
        threads=1,
    )
    return plain


def bubble_figures(base: list[str], skip: int, work, per_core_all_busy: float) -> None:
    """bubble_gap_pts from a pp=1 and a pp=2 run, and bubble_wait_gap_pts from the pp=2 run's own waits."""
    pipe_cfg = load_config(TINY, base + PIPELINE + ["parallel.pp=2"])
    stages = stage_costs(pipe_cfg)
    one_stage, _ = raylm_run("bubble-pp1", base + PIPELINE + ["parallel.pp=1"], work)
    two_stage, _ = raylm_run("bubble-pp2", base + PIPELINE + ["parallel.pp=2"], work)
    p, m = 2, micro_batches_for(pipe_cfg.train.global_batch, pipe_cfg)
    t1, t2 = steady(one_stage, "step_s", skip), steady(two_stage, "step_s", skip)
    waited = steady(two_stage, "pipe_wait_frac", skip)
    measured = 1 - (t1 / p) / t2
    formula = (p - 1) / (m + p - 1)
    emit(
        bubble_gap_pts=round(100 * (measured - formula), 2),
        bubble_measured=round(measured, 4),
        bubble_formula=round(formula, 4),
        step_s_pp1=round(t1, 4),
        step_s_pp2=round(t2, 4),
        stage_flops_share=[round(c / sum(stages), 3) for c in stages],
        target=5.0,
    )
    emit(
        bubble_wait_gap_pts=round(100 * (waited - formula), 2),
        stage0_wait_frac=round(waited, 4),
        stage_compute_vs_pp1=round(t2 * (1 - waited) / (t1 / p), 3),
        per_core_speed_all_busy=round(per_core_all_busy, 3),
        target=5.0,
    )


def stage_costs(cfg: Config) -> list[int]:
    """Each pipeline stage's estimated training FLOPs per token under the config's partition."""
    from deepspeed.runtime.utils import partition_balanced

    costs = layer_costs(cfg.model, padded_vocab(cfg.data.vocab_size), cfg.data.seq_len)
    bounds = [int(b) for b in partition_balanced(costs, cfg.parallel.pp)]
    return [sum(costs[a:b]) for a, b in pairwise(bounds)]


if __name__ == "__main__":
    main()
