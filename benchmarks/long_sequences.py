"""Long-sequence benchmark: the longest window one training step of the tiny model takes within a per-rank memory cap.

For each setting at tp = 2 (plain TP, sequence parallelism, each with and without activation checkpointing, and
plain TP with document masks, with and without checkpointing; masks do not combine with sequence parallelism yet),
one pair of fresh gloo ranks (tests/distributed/dist_harness.run_world) builds the tiny config's model
(jobs/configs/tiny.yaml: 4 blocks of d = 128, 4 heads, vocab 2048; pp = 1, dp = 1, fp32, one micro-batch of one
window), trains a warm-up step (which allocates the gradients and AdamW's state), then one step at each window
length from --start, doubling, until a step's memory exceeds the cap on some rank. A step's memory is what
benchmarks/sequence_parallel.py measures: the rank's peak RSS during the step above its RSS before it (buffers of
64 KiB or more are mapped on their own and returned on free), i.e. the activations autograd keeps and the step's
transients; the model states (16 bytes per parameter, about 9 MB per rank here) are in the RSS before. Windows
under document masks hold documents of DOC_TOKENS tokens (the mask's size does not depend on where they end).
Figures (one JSON object per line):
  step_mem_mb                per setting and window: each rank's step memory, the step's seconds (rank 0), and
                             predicted_mb, what `raylm plan`'s activation model (raylm.plan.memory) predicts
  longest_seq_len            per setting: the longest window whose step stayed within the cap on every rank
                             (at_longest_tried: it is --longest, and the cap would allow more)
  sp_step_mem_ratio          at the longest window both ran: step memory with sequence parallelism over without,
                             largest rank, with checkpointing off and on (benchmarks/sequence_parallel.py
                             measures the same ratio on a 64-block model where the blocks weigh more)
No arguments: a cap of 256 MiB per rank, windows from 1024 to at most 16384. `--dry`: a cap of 8 MiB, windows
from 128 to 1024, to check the script.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import NamedTuple

from common import REPO_ROOT, TINY, emit
from sequence_parallel import MMAP_THRESHOLD, step_memory

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
import dist_harness  # noqa: E402

CAP_MB = 256
START = 1024
LONGEST = 1 << 14  # no window beyond this is tried, whatever the cap (a step at 2^15 takes minutes here)
DOC_TOKENS = 512


class Setting(NamedTuple):
    sequence_parallel: bool
    activation_checkpointing: bool
    document_mask: bool


SETTINGS = [
    Setting(False, False, False),
    Setting(True, False, False),
    Setting(False, True, False),
    Setting(True, True, False),
    Setting(False, False, True),
    Setting(False, True, True),
]


def setting_config(setting: Setting, start: int, longest: int):
    from raylm.config import load_config

    return load_config(
        TINY,
        [
            "parallel.pp=1",
            "parallel.tp=2",
            "parallel.dp=1",
            "parallel.zero_stage=0",
            "parallel.micro_batch=1",
            "train.global_batch=1",
            f"data.seq_len={start}",
            f"model.max_seq_len={longest}",  # RoPE tables for every window tried
            f"parallel.sequence_parallel={str(setting.sequence_parallel).lower()}",
            f"parallel.activation_checkpointing={str(setting.activation_checkpointing).lower()}",
            f"data.document_mask={str(setting.document_mask).lower()}",
        ],
    )


def window_batch(seq_len: int, vocab_size: int, document_mask: bool, seed: int):
    """One micro-batch of one random window: (inputs, labels), inputs (tokens, doc ids, positions) under masks."""
    import torch

    from raylm.data.documents import document_ids, document_positions
    from raylm.data.tokenizer import EOT_ID

    window = torch.randint(
        EOT_ID + 1, vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )
    if not document_mask:
        return window[:, :-1], window[:, 1:]
    window[:, DOC_TOKENS - 1 :: DOC_TOKENS] = EOT_ID  # documents of DOC_TOKENS tokens, each ended by EOT
    tokens = window[:, :-1].numpy()
    documents = (
        torch.from_numpy(document_ids(tokens)),
        torch.from_numpy(document_positions(tokens, "continue")),
    )
    return (window[:, :-1], *documents), window[:, 1:]


def setting_rank(
    rank: int, world_size: int, setting: Setting, start: int, longest: int, cap: int
) -> list[dict]:
    """This rank's step memory at each window from `start`, doubling, until some rank's exceeds `cap` bytes."""
    import torch
    import torch.distributed as dist

    from raylm.parallel.engine import build_engine
    from raylm.parallel.host_alloc import map_large_allocations

    map_large_allocations(MMAP_THRESHOLD)
    cfg = setting_config(setting, start, longest)
    engine = build_engine(cfg)

    def step(seq_len: int) -> None:
        engine.set_seq_len(seq_len)
        engine.train_batch(iter([window_batch(seq_len, cfg.data.vocab_size, setting.document_mask, seq_len)]))

    step(start)  # warm-up: the gradients and AdamW's moments exist from here on
    rows, seq_len = [], start
    while seq_len <= longest:
        began = time.perf_counter()
        used = step_memory(functools.partial(step, seq_len))
        rows.append({"seq_len": seq_len, "step_mem": used, "step_s": time.perf_counter() - began})
        most = torch.tensor([used])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)  # every rank stops at the same window
        if most.item() > cap:
            break
        seq_len *= 2
    return rows


def predicted_bytes(setting: Setting, seq_len: int, longest: int) -> float:
    """`raylm plan`'s activation bytes for the setting's rank at this window (the fullest stage's)."""
    from raylm.plan.memory import RankSetup, stage_activation_bytes
    from raylm.plan.stages import model_shape, stages

    cfg = setting_config(setting, seq_len, longest)
    shape = model_shape(cfg, cfg.parallel.tp)
    setup = RankSetup(
        pp=1,
        tp=cfg.parallel.tp,
        dp=1,
        zero_stage=0,
        micro_batch=1,
        micro_batches=1,
        checkpointing=setting.activation_checkpointing,
        precision=cfg.train.precision,
        sequence_parallel=setting.sequence_parallel,
        document_mask=setting.document_mask,
    )
    return max(
        stage_activation_bytes(shape, stage, setup) for stage in stages(shape, 1, cfg.parallel.partition)
    )


def run_setting(setting: Setting, start: int, longest: int, cap: int) -> dict[int, int]:
    """Emit each window's figures for one setting and its longest window within the cap; {window: largest rank's
    step memory}."""
    per_rank = dist_harness.run_world(2, setting_rank, setting, start, longest, cap)
    largest = {}
    for rows in zip(*per_rank, strict=True):
        seq_len = rows[0]["seq_len"]
        largest[seq_len] = max(r["step_mem"] for r in rows)
        emit(
            step_mem_mb=[round(r["step_mem"] / 2**20, 1) for r in rows],
            step_s=round(rows[0]["step_s"], 2),
            predicted_mb=round(predicted_bytes(setting, seq_len, longest) / 2**20, 1),
            seq_len=seq_len,
            tp=2,
            **setting._asdict(),
        )
    within = [n for n, used in largest.items() if used <= cap]
    emit(
        longest_seq_len=max(within, default=0),
        cap_mb=round(cap / 2**20),
        at_longest_tried=max(within, default=0) == longest,  # the cap would take a longer window still
        tp=2,
        **setting._asdict(),
    )
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-mb", type=float, default=CAP_MB, help="per-rank step memory cap in MiB")
    parser.add_argument("--start", type=int, default=START, help="the first window length (a power of two)")
    parser.add_argument("--longest", type=int, default=LONGEST, help="the longest window tried")
    parser.add_argument(
        "--dry", action="store_true", help="cap 8 MiB, windows 128 to 1024: checks the script"
    )
    args = parser.parse_args()
    cap_mb, start, longest = (8, 128, 1024) if args.dry else (args.cap_mb, args.start, args.longest)
    dist_harness.TIMEOUT_S = 1800
    measured = {s: run_setting(s, start, longest, int(cap_mb * 2**20)) for s in SETTINGS}
    for checkpointing in (False, True):
        plain, split = (measured[Setting(sp, checkpointing, False)] for sp in (False, True))
        seq_len = max(set(plain) & set(split))
        emit(
            sp_step_mem_ratio=round(split[seq_len] / plain[seq_len], 3),
            activation_checkpointing=checkpointing,
            seq_len=seq_len,
            dry=args.dry,
        )


if __name__ == "__main__":
    main()
