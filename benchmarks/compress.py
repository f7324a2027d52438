"""Compression benchmark: what quantization, pruning with sparse fine-tuning and bf16 gradient reduction cost.

One run, one JSON line. tiny.yaml's model is trained `--steps` (300) steps (pp=1, through `raylm train`), exported,
then compressed with `raylm compress` and evaluated on the same validation samples (`raylm eval`'s):
  int8_ppl_ratio         perplexity int8 / fp32 (target <= 1.01); int8_size_ratio: stored bytes / fp32 bytes
                         (target <= 0.45: the compressed-tensors format keeps the tied embedding, a quarter of this
                         model, in fp32)
  int4_ppl_ratio         the same for int4, group size `--group-size` (64; target <= 1.10), int4_size_ratio
  prune50_ppl_ratio      50% unstructured magnitude pruning, before and after `--finetune-steps` (100) sparse
                         fine-tuning steps (`raylm train model.init_from=PRUNED`), against the dense model
                         (target after <= 1.05); prune24_ppl_ratio the same for 2:4
  grad_bf16_loss_diff    the largest |loss difference| over `--comm-steps` (50) steps of two dp=2 runs from the dense
                         weights on the same data, DP gradients reduced in fp32 or bf16 (parallel.grad_comm_dtype);
                         dp_reduce_bytes_per_step_fp32/_bf16: bytes each rank passed to gradient-reducing
                         collectives per step, counted at torch.distributed (the same 2 ranks, gloo)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import TINY, emit, ensure_prepared, scratch_dir
from train import raylm_run

from raylm.checkpoint.export import export
from raylm.compress.apply import CompressOptions, compress
from raylm.config import load_config
from raylm.evaluate import evaluate

QUIET = ["train.log_every=10", "train.report_every=50"]
REDUCING = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce")


def sparse_finetune(pruned: Path, name: str, steps: int, work: Path, base: list[str], data: str) -> float:
    """Perplexity after `steps` steps of `raylm train model.init_from=pruned` (pruned entries held at 0)."""
    raylm_run(
        name,
        base
        + [
            f"model.init_from={pruned}",
            f"train.max_steps={steps}",
            "schedule.lr.warmup_steps=10",
            "optim.lr=1e-3",
        ],
        work,
    )
    export(work / name, work / f"{name}-export")
    return evaluate(work / f"{name}-export", data=data)["ppl"]


def compressed_ppl(dense: Path, out: Path, data: str, **options) -> dict:
    return compress(CompressOptions(source=str(dense), out_dir=str(out), eval_data=data, **options))


def comm_rank(rank: int, world_size: int, port: int, dense: str, data: str, steps: int, results) -> None:
    """One of 2 gloo ranks: train `steps` steps from the dense export under each grad_comm_dtype; losses and
    the bytes of gradient-reducing collectives per step."""
    import os

    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK="0",
    )
    torch.set_num_threads(1)
    counted = {"bytes": 0}

    def counting(op):
        def wrapper(*args, **kwargs):
            tensor = args[0] if args else next(iter(kwargs.values()))
            counted["bytes"] += tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0
            return op(*args, **kwargs)

        return wrapper

    for name in REDUCING:  # before DeepSpeed starts: its backend keeps references to these functions
        setattr(dist, name, counting(getattr(dist, name)))
    from raylm.data.stream import RankStream
    from raylm.model.weights import starting_weights
    from raylm.parallel.engine import build_engine, init_distributed

    init_distributed("gloo")
    out = {}
    for dtype in ("fp32", "bf16"):
        cfg = load_config(
            TINY,
            [
                "parallel.pp=1",
                "parallel.dp=2",
                f"parallel.grad_comm_dtype={dtype}",
                f"model.init_from={dense}",
                f"data.out_dir={data}",
            ],
        )
        engine = build_engine(cfg, starting_weights(cfg))
        stream = RankStream(
            data,
            "train",
            cfg.data.seq_len,
            cfg.run.seed,
            engine.coords.dp_rank,
            2,
            cfg.parallel.micro_batch,
            prefetch=0,
        )
        losses, per_step = [], []
        for _ in range(steps):
            counted["bytes"] = 0
            losses.append(engine.train_batch(stream))
            per_step.append(counted["bytes"])
        stream.close()
        out[dtype] = {"losses": losses, "bytes_per_step": statistics.median(per_step)}
    results.put((rank, json.dumps(out)))


def grad_comm_figures(dense: Path, data: str, steps: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        ctx.Process(target=comm_rank, args=(r, 2, port, str(dense), data, steps, results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    outs = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    fp32, bf16 = (json.loads(outs[0])[k] for k in ("fp32", "bf16"))
    return {
        "grad_bf16_loss_diff": max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=False)),
        "grad_comm_steps": steps,
        "dp_reduce_bytes_per_step_fp32": fp32["bytes_per_step"],
        "dp_reduce_bytes_per_step_bf16": bf16["bytes_per_step"],
        "dp_reduce_bytes_ratio": bf16["bytes_per_step"] / fp32["bytes_per_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the dense model")
    parser.add_argument(
        "--finetune-steps", type=int, default=100, help="sparse fine-tuning steps after pruning"
    )
    parser.add_argument("--comm-steps", type=int, default=50, help="steps of each grad_comm_dtype run")
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size")
    parser.add_argument(
        "--data", default=None, help="a prepared tiny data folder (default: tiny.yaml's data.out_dir)"
    )
    args = parser.parse_args()
    work = scratch_dir("raylm-compress-bench-")
    base = QUIET + ["parallel.pp=1"] + ([f"data.out_dir={args.data}"] if args.data else [])
    cfg = load_config(TINY, base)
    ensure_prepared(cfg)
    data = str(Path(cfg.data.out_dir).resolve())
    base.append(f"data.out_dir={data}")
    raylm_run("dense", base + [f"train.max_steps={args.steps}"], work)
    dense = work / "dense-export"
    export(work / "dense", dense)
    int8 = compressed_ppl(dense, work / "int8", data, quantize="int8")
    int4 = compressed_ppl(dense, work / "int4", data, quantize="int4", group_size=args.group_size)
    p50 = compressed_ppl(dense, work / "p50", data, prune=0.5)
    p24 = compressed_ppl(dense, work / "p24", data, prune=0.5, pattern="2:4")
    dense_ppl = int8["ppl_before"]
    p50_after = sparse_finetune(work / "p50", "p50-ft", args.finetune_steps, work, base, data)
    p24_after = sparse_finetune(work / "p24", "p24-ft", args.finetune_steps, work, base, data)
    comm = grad_comm_figures(dense, data, args.comm_steps)
    emit(
        dense_steps=args.steps,
        dense_val_loss=round(int8["loss_before"], 4),
        dense_ppl=round(dense_ppl, 3),
        int8_ppl_ratio=round(int8["ppl_ratio"], 4),
        int8_size_ratio=round(int8["size_ratio"], 4),
        int4_ppl_ratio=round(int4["ppl_ratio"], 4),
        int4_size_ratio=round(int4["size_ratio"], 4),
        int4_group_size=args.group_size,
        prune50_ppl_ratio_before=round(p50["ppl_ratio"], 4),
        prune50_ppl_ratio_after=round(p50_after / dense_ppl, 4),
        prune24_ppl_ratio_before=round(p24["ppl_ratio"], 4),
        prune24_ppl_ratio_after=round(p24_after / dense_ppl, 4),
        finetune_steps=args.finetune_steps,
        **{k: round(v, 5) if isinstance(v, float) else v for k, v in comm.items()},
        targets={
            "int8_ppl_ratio": 1.01,
            "int8_size_ratio": 0.45,
            "int4_ppl_ratio": 1.10,
            "prune50_ppl_ratio_after": 1.05,
        },
    )


if __name__ == "__main__":
    main()
