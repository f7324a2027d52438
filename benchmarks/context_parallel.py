"""Context-parallel benchmark, side by side in one run: a rank's step memory at cp = 2 against cp = 1, and the
longest window each trains within a step-memory budget per rank.

The tiny config's model (4 blocks, d = 128, 4 heads, vocab 2048; pp = tp = dp = 1, one micro-batch, fp32) trains
at cp = 1 on one rank and at cp = 2 (DeepSpeed-Ulysses) on two fresh gloo ranks, each measured as
benchmarks/sequence_parallel.py measures a step (`engine_step_memory`: the peak RSS of a second step above the RSS
before it, large buffers mapped and returned on free). The window doubles from 1024 positions for as long as the
largest rank's step memory stays within the budget. Figures (one JSON object per line):
  step_mem_mb            per cp and seq_len, per rank
  cp_activation_ratio    at each seq_len both ran: largest cp = 2 rank's step memory over cp = 1's (ideal 0.5)
  longest_seq_len        per cp: the longest window trained within --budget-mb per rank
  longest_seq_ratio      cp = 2's longest window over cp = 1's
`--dry`: one 512-position step each, to check the script in seconds.
Measured on 2 CPU cores (defaults): cp_activation_ratio 0.517 at 1k-8k positions; longest_seq_len 4096 at cp = 1
and 8192 at cp = 2 within 256 MB per rank (docs/long-sequences.md "Context parallelism").
"""

from __future__ import annotations

import argparse

from common import emit
from sequence_parallel import dist_harness, engine_step_memory

MODEL = {"n_layer": 4, "n_head": 4, "d_model": 128}  # jobs/configs/tiny.yaml's
VOCAB = 2048
START_SEQ_LEN = 1024
MAX_SEQ_LEN = 65536
BUDGET_MB = 256


def cp_config(cp: int, seq_len: int):
    from raylm.config import resolve

    return resolve(
        {
            "data": {"vocab_size": VOCAB, "seq_len": seq_len},
            "model": {**MODEL, "max_seq_len": seq_len},
            "parallel": {"pp": 1, "tp": 1, "dp": 1, "cp": cp, "micro_batch": 1},
            "train": {"precision": "fp32", "global_batch": 1},
        }
    )


def cp_rank(rank: int, world_size: int, seq_len: int) -> int:
    return engine_step_memory(cp_config(world_size, seq_len))


def measure(cp: int, seq_len: int) -> float:
    """The largest rank's step memory in MB at (cp, seq_len), with the row it emits."""
    per_rank = [b / 2**20 for b in dist_harness.run_world(cp, cp_rank, seq_len)]
    emit(step_mem_mb=[round(mb, 1) for mb in per_rank], cp=cp, seq_len=seq_len)
    return max(per_rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=BUDGET_MB, help="step memory allowed per rank")
    parser.add_argument("--dry", action="store_true", help="one 512-position step per cp: checks the script")
    args = parser.parse_args()
    dist_harness.TIMEOUT_S = 900
    start, stop = (512, 512) if args.dry else (START_SEQ_LEN, MAX_SEQ_LEN)
    step_mb: dict[tuple[int, int], float] = {}
    longest = {}
    for cp in (1, 2):
        seq_len, longest[cp] = start, 0
        while seq_len <= stop:
            step_mb[cp, seq_len] = measure(cp, seq_len)
            if step_mb[cp, seq_len] > args.budget_mb:
                break
            longest[cp], seq_len = seq_len, seq_len * 2
    for seq_len in sorted({s for c, s in step_mb if c == 1} & {s for c, s in step_mb if c == 2}):
        emit(cp_activation_ratio=round(step_mb[2, seq_len] / step_mb[1, seq_len], 3), seq_len=seq_len)
    for cp in (1, 2):
        emit(longest_seq_len=longest[cp], cp=cp, budget_mb=args.budget_mb, dry=args.dry)
    if longest[1]:
        emit(longest_seq_ratio=round(longest[2] / longest[1], 3), budget_mb=args.budget_mb, dry=args.dry)


if __name__ == "__main__":
    main()
