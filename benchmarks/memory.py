"""Memory benchmark, side by side in one run: each layout's peak RSS against its ideal, and checkpoint bandwidth.

Every layout runs in fresh gloo ranks started by tests/distributed/dist_harness.run_world (no Ray, so an idle
worker's RSS is a clean baseline). Figures (one JSON object per line):
  idle_worker_rss_mb    peak RSS of a rank that imported torch, deepspeed and raylm, joined gloo and did nothing
  rss_vs_ideal          per layout (pp, tp, dp, zero): each rank's peak RSS after one training step minus the idle
                        worker's, over its own weights + grads + AdamW state (4 + 4 + 8 bytes per element of its
                        own parameters; what ZeRO partitions divided by dp, docs/parallelism.md "ZeRO limits");
                        `max` over ranks per layout, and rss_vs_ideal_max over every layout
  rss_pp4_vs_pp1        the largest rank's net peak RSS at pp=4 (ZeRO-1) over pp=1 (ZeRO 0)
  rss_zero3_dp2_vs_dp1  the largest rank's net peak RSS at dp=2 ZeRO-3 over dp=1 (ZeRO 0)
  ckpt_write_bw_frac    raylm save_checkpoint bytes/s of the (1,1,1,0) engine over a plain loop writing the same
                        files' bytes with fsync in the same run
  ckpt_read_bw_frac     load_checkpoint bytes/s over the plain loop reading them back; the page cache of every file
                        is dropped (posix_fadvise DONTNEED) before each side reads
No arguments: a ~300M-parameter model (d=1024, 24 layers, seq 128, micro-batch 1, fp32), the size the figures
are set for; it needs about 6 GB for the largest single rank. `--layers 12` halves it where memory is short (the
ratios rise a little as depth falls: fixed costs weigh more).
`--dry`: a tiny model and the (1,1,1,0) layout only, so the script is checked in seconds. `--layouts 1,1,1,0 1,1,2,3`
runs only those layouts (a ratio is printed when both of its layouts ran; checkpoint bandwidth with (1,1,1,0)).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from common import REPO_ROOT, emit, scratch_dir

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

LAYOUTS = [(1, 1, 1, 0), (2, 1, 1, 1), (4, 1, 1, 1), (1, 2, 1, 0), (1, 1, 2, 3)]  # (pp, tp, dp, zero_stage)
BASE = {
    "data": {"vocab_size": 2048, "seq_len": 128},
    "model": {"n_layer": 24, "n_head": 16, "d_model": 1024, "max_seq_len": 128},
    "parallel": {"micro_batch": 1},
    "train": {"precision": "fp32"},
}
DRY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4"]
RATIOS = [
    ("rss_pp4_vs_pp1", (4, 1, 1, 1), 0.35),
    ("rss_zero3_dp2_vs_dp1", (1, 1, 2, 3), 0.6),
]  # each over (1,1,1,0)
BYTES_PER_ELEMENT = {
    "weights": 4,
    "grads": 4,
    "adam": 8,
}  # fp32 weights, fp32 grads, AdamW's two fp32 moments
CHUNK = 64 << 20  # the plain loop's write and read size


def parse_layout(text: str) -> tuple[int, int, int, int]:
    """'1,1,2,3' -> (1, 1, 2, 3), one of LAYOUTS."""
    layout = tuple(int(x) for x in text.split(",")) if text.replace(",", "").isdigit() else None
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of the layouts: {' '.join(','.join(map(str, x)) for x in LAYOUTS)}"
        )
    return layout


def layout_config(layout: tuple[int, int, int, int], model: list[str], data_dir: str):
    """The benchmark config for one layout: one micro-batch per DP rank per step."""
    from raylm.config import resolve

    pp, tp, dp, zero = layout
    return resolve(
        BASE,
        [
            f"parallel.pp={pp}",
            f"parallel.tp={tp}",
            f"parallel.dp={dp}",
            f"parallel.zero_stage={zero}",
            f"train.global_batch={dp}",
            f"data.out_dir={data_dir}",
            *model,
        ],
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def idle_rank(rank: int, world_size: int) -> int:
    """The baseline: the harness has imported torch and joined gloo; import what a training rank imports too."""
    import deepspeed  # noqa: F401

    import raylm.checkpoint  # noqa: F401
    import raylm.parallel.engine  # noqa: F401

    return peak_rss_bytes()


def ideal_bytes(engine, zero: int) -> int:
    """This rank's weights + grads + AdamW state from its own parameter counts (TP shards, its stage only)."""
    from raylm.parallel.param_state import local_shape

    params = {id(p): p for p in engine.layers.params.values()}.values()  # a tied weight counts once per rank
    elements = sum(math.prod(local_shape(p)) for p in params)
    dp = engine.topo.dp
    partitioned = {"weights": zero >= 3, "grads": zero >= 2, "adam": zero >= 1}
    return sum(
        elements * size // (dp if partitioned[kind] else 1) for kind, size in BYTES_PER_ELEMENT.items()
    )


def one_step(engine, cfg) -> float:
    import torch

    gen = torch.Generator().manual_seed(engine.coords.dp_rank)
    shape = (cfg.parallel.micro_batch, cfg.data.seq_len + 1)
    batches = [
        (t[:, :-1], t[:, 1:])
        for t in (
            torch.randint(0, cfg.data.vocab_size, shape, generator=gen) for _ in range(engine.micro_batches)
        )
    ]
    return engine.train_batch(iter(batches) if engine.reads_data else None)


def layout_rank(rank: int, world_size: int, layout, model: list[str], work: str, checkpoint: bool) -> dict:
    """Build the engine, train one step, read peak RSS; then (checkpoint) time a save and a load."""
    from raylm.parallel.engine import build_engine

    cfg = layout_config(layout, model, os.path.join(work, "no-data"))
    engine = build_engine(cfg)
    loss = one_step(engine, cfg)
    out = {"rank": rank, "peak_rss": peak_rss_bytes(), "ideal": ideal_bytes(engine, layout[3]), "loss": loss}
    if checkpoint:
        out.update(time_checkpoint(engine, cfg, Path(work) / "checkpoints"))
    return out


def time_checkpoint(engine, cfg, folder: Path) -> dict:
    """Seconds for save_checkpoint and for load_checkpoint (page cache of its files dropped first), and the bytes."""
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    start = time.perf_counter()
    path = save_checkpoint(engine, cfg, folder, 1, {"step": 1})
    save_s = time.perf_counter() - start
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        drop_cache(p)
    start = time.perf_counter()
    load_checkpoint(engine, cfg, path)
    load_s = time.perf_counter() - start
    return {"save_s": save_s, "load_s": load_s, "file_sizes": [p.stat().st_size for p in files]}


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write_read_s(sizes: list[int], folder: Path) -> tuple[float, float]:
    """The yardstick: write files of these sizes (fsync each), then read them back with the page cache dropped."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)
    paths = [folder / f"{i:04d}.bin" for i in range(len(sizes))]
    start = time.perf_counter()
    for path, size in zip(paths, sizes, strict=False):
        with open(path, "wb") as f:
            for offset in range(0, size, CHUNK):
                f.write(block[: min(CHUNK, size - offset)])
            f.flush()
            os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    for path in paths:
        drop_cache(path)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(CHUNK):
                pass
    return write_s, time.perf_counter() - start


def run_layout(layout, model: list[str], work: Path, checkpoint: bool = False) -> list[dict]:
    pp, tp, dp, _ = layout
    return dist_harness.run_world(pp * tp * dp, layout_rank, layout, model, str(work), checkpoint)


def net_mb(rank: dict, idle: int) -> float:
    return (rank["peak_rss"] - idle) / 2**20


def emit_layout(layout, ranks: list[dict], idle: int) -> float:
    """One rss_vs_ideal line for a layout; returns its worst rank's ratio."""
    ratios = [(r["peak_rss"] - idle) / r["ideal"] for r in ranks]
    pp, tp, dp, zero = layout
    emit(
        rss_vs_ideal=round(max(ratios), 3),
        pp=pp,
        tp=tp,
        dp=dp,
        zero=zero,
        per_rank=[round(x, 3) for x in ratios],
        net_rss_mb=[round(net_mb(r, idle)) for r in ranks],
        ideal_mb=[round(r["ideal"] / 2**20) for r in ranks],
        target=1.5,
    )
    return max(ratios)


def emit_checkpoint(rank0: dict, work: Path) -> None:
    sizes = rank0["file_sizes"]
    total = sum(sizes)
    write_s, read_s = plain_write_read_s(sizes, work / "plain")
    emit(
        ckpt_write_bw_frac=round(write_s / rank0["save_s"], 3),
        raylm_mb_per_s=round(total / 2**20 / rank0["save_s"]),
        plain_mb_per_s=round(total / 2**20 / write_s),
        ckpt_mb=round(total / 2**20),
        files=len(sizes),
        target=0.5,
    )
    emit(
        ckpt_read_bw_frac=round(read_s / rank0["load_s"], 3),
        raylm_mb_per_s=round(total / 2**20 / rank0["load_s"]),
        plain_mb_per_s=round(total / 2**20 / read_s),
        ckpt_mb=round(total / 2**20),
        files=len(sizes),
        target=0.5,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny model, the (1,1,1,0) layout only")
    parser.add_argument("--layers", type=int, default=BASE["model"]["n_layer"], help="transformer blocks")
    parser.add_argument(
        "--layouts",
        nargs="+",
        type=parse_layout,
        default=LAYOUTS,
        metavar="PP,TP,DP,ZERO",
        help="the layouts to run (default: all five)",
    )
    args = parser.parse_args()
    model = DRY_MODEL if args.dry else [f"model.n_layer={args.layers}"]
    layouts = LAYOUTS[:1] if args.dry else args.layouts
    dist_harness.TIMEOUT_S = 900  # a 300M-parameter step and checkpoint on one thread per rank
    dist_harness.START_METHOD = "spawn"  # fresh processes: nothing inherited from a preloaded server
    work = scratch_dir("raylm-memory-bench-")
    try:
        idle = dist_harness.run_world(1, idle_rank)[0]
        emit(idle_worker_rss_mb=round(idle / 2**20), dry=args.dry, layers=args.layers if not args.dry else 2)
        largest, worst = {}, []
        for layout in layouts:
            ranks = run_layout(layout, model, work, checkpoint=layout == LAYOUTS[0])
            worst.append(emit_layout(layout, ranks, idle))
            largest[layout] = max(net_mb(r, idle) for r in ranks)
            if layout == LAYOUTS[0]:
                emit_checkpoint(ranks[0], work)
        emit(rss_vs_ideal_max=round(max(worst), 3), target=1.5)
        if args.dry:
            return
        for name, layout, target in RATIOS:
            if layout in largest and LAYOUTS[0] in largest:
                emit(**{name: round(largest[layout] / largest[LAYOUTS[0]], 3)}, target=target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
