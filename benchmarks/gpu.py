"""GPU benchmark: gpt2-small (124M, seq 1024, bf16) for ~100 steps on one GPU; tokens/s, MFU, peak memory.

`python benchmarks/gpu.py` on a single-GPU machine (after `make install`). `--dry` runs the same path on
CPU with a shrunken model and a few steps, so the script is exercised by the tests and does not rot.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from common import REPO_ROOT, emit, run_training, scratch_dir, steady

GPT2_SMALL = REPO_ROOT / "jobs" / "configs" / "gpt2-small.yaml"


def overrides(dry: bool) -> list[str]:
    work = scratch_dir("raylm-gpu-bench-")
    common = [f"run.dir={work / 'runs'}", f"data.out_dir={work / 'data'}", "run.name=gpu-bench",
              "parallel.pp=1", "parallel.tp=1", "parallel.dp=1", "parallel.zero_stage=0",
              "schedule.batch.start=0", "checkpoint.every_steps=0", "train.eval_every=0", "train.eval_batches=1",
              "train.log_every=1", "fault.max_failures=0"]
    if dry:
        # a small slice of the default corpus keeps `prepare` to seconds
        stdlib_json = Path(sysconfig.get_paths()["stdlib"]) / "json"
        return common + [f"data.paths=['{stdlib_json}']", "parallel.use_gpu=false", "train.max_steps=4", "train.global_batch=4",
                         "parallel.micro_batch=2", "model.n_layer=2", "model.d_model=64", "model.n_head=2",
                         "data.vocab_size=512", "data.seq_len=64", "model.max_seq_len=64", "train.precision=fp32"]
    return common + ["parallel.use_gpu=true", "train.max_steps=100", "train.global_batch=32",
                     "parallel.micro_batch=16", "parallel.activation_checkpointing=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model, 4 steps: checks the script runs")
    args = parser.parse_args()
    rows, _ = run_training(GPT2_SMALL, overrides(args.dry))
    skip = 1 if args.dry else 10
    emit(tokens_per_s=round(steady(rows, "tokens_per_s", skip), 1), mfu=round(steady(rows, "mfu", skip), 4),
         peak_mem_gb=round(max(r.get("peak_mem_gb", 0.0) for r in rows), 2), steps=len(rows),
         final_loss=round(rows[-1]["loss"], 4), dry=args.dry, target_mfu=0.40)


if __name__ == "__main__":
    main()
