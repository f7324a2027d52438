"""Sequence-parallel benchmark, side by side in one run: activation memory per rank at tp = 2 with and without it.

Each variant trains one tp = 2 layout (pp = 1, dp = 1, fp32, one micro-batch) on its own fresh gloo ranks
started by tests/distributed/dist_harness.run_world, at a sequence length where activations dominate the step's
memory. On each rank, host allocations of 64 KiB or more are served by mmap and returned on free
(raylm.parallel.host_alloc), so the resident set follows the live tensors; after a warm-up step (which
allocates the optimizer state) the peak RSS is reset and measured over a second step. A rank's step memory =
that peak minus its RSS before the step: the activations autograd keeps, plus the step's transients, which are
the same with and without sequence parallelism. Figures (one JSON object per line):
  step_mem_mb                per variant and rank, with the variant's settings
  sp_activation_ratio        largest rank's step memory with sequence parallelism over without, activation
                             checkpointing off: the norms' inputs and normalised outputs shrink by tp; the TP
                             regions' own activations (already split by TP) and their gathered inputs do not
  sp_activation_ratio_recompute  the same with activation checkpointing on: what each block keeps is its input,
                             the residual stream, which sequence parallelism splits over tp; one block
                             recomputed at a time and the loss's logits come on top
No arguments: 64 blocks of d = 128, seq_len 2048, where the activations are several times the model states.
`--dry`: seq_len 256, 2 blocks, to check the script in seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common import REPO_ROOT, emit
from memory import one_step

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

MODEL = {"n_layer": 64, "n_head": 4, "n_kv_head": 4, "d_model": 128}
SEQ_LEN = 2048
VOCAB = 300  # padded to 384: the loss's logits (the same with and without) weigh little beside the blocks
# every buffer of at least this many bytes is mmapped and unmapped on free, so the warm-up step's freed activations
# are not reused unseen by the measured step (an activation here is 1 MiB, glibc's default threshold 128 KiB)
MMAP_THRESHOLD = 64 << 10
VARIANTS = [  # (sequence_parallel, activation_checkpointing)
    (False, False),
    (True, False),
    (False, True),
    (True, True),
]


def variant_config(seq_len: int, n_layer: int, sequence_parallel: bool, checkpointing: bool):
    from raylm.config import resolve

    return resolve(
        {
            "data": {"vocab_size": VOCAB, "seq_len": seq_len},
            "model": {**MODEL, "n_layer": n_layer, "max_seq_len": seq_len},
            "parallel": {
                "pp": 1,
                "tp": 2,
                "dp": 1,
                "micro_batch": 1,
                "sequence_parallel": sequence_parallel,
                "activation_checkpointing": checkpointing,
            },
            "train": {"precision": "fp32", "global_batch": 1},
        }
    )


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def step_memory(step: Callable[[], object]) -> int:
    """Peak RSS while step() runs above the RSS before it (with MMAP_THRESHOLD mapped, freed buffers leave)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    before = rss_bytes("VmRSS")
    step()
    return rss_bytes("VmHWM") - before


def engine_step_memory(cfg) -> int:
    """This rank's step memory for `cfg` (all ranks call, each in a fresh process, so nothing freed by another
    variant is reused): the peak RSS of a second training step above the RSS before it."""
    from raylm.parallel.engine import build_engine
    from raylm.parallel.host_alloc import map_large_allocations

    map_large_allocations(MMAP_THRESHOLD)
    engine = build_engine(cfg)
    one_step(engine, cfg)  # warm-up: AdamW's moments and the gradients exist from here on
    return step_memory(lambda: one_step(engine, cfg))


def variant_rank(rank: int, world_size: int, seq_len: int, n_layer: int, variant: tuple[bool, bool]) -> int:
    """One variant's step memory on this rank."""
    return engine_step_memory(variant_config(seq_len, n_layer, *variant))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="seq_len 256 and 2 blocks: checks the script only")
    args = parser.parse_args()
    seq_len, n_layer = (256, 2) if args.dry else (SEQ_LEN, MODEL["n_layer"])
    dist_harness.TIMEOUT_S = 900
    largest = {}
    for sequence_parallel, checkpointing in VARIANTS:
        variant = (sequence_parallel, checkpointing)
        per_rank = dist_harness.run_world(2, variant_rank, seq_len, n_layer, variant)
        largest[sequence_parallel, checkpointing] = max(per_rank)
        emit(
            step_mem_mb=[round(b / 2**20, 1) for b in per_rank],
            tp=2,
            sequence_parallel=sequence_parallel,
            activation_checkpointing=checkpointing,
            seq_len=seq_len,
            n_layer=n_layer,
        )
    for name, checkpointing in (("sp_activation_ratio", False), ("sp_activation_ratio_recompute", True)):
        ratio = largest[True, checkpointing] / largest[False, checkpointing]
        emit(**{name: round(ratio, 3)}, target=0.6, dry=args.dry)


if __name__ == "__main__":
    main()
