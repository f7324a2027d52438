"""GPU benchmark: tokens/s, MFU and peak memory of gpt2-small (124M) and a ~1B model, one JSON line per layout.

`python benchmarks/gpu.py` on a GPU machine (after `make install`) runs every (pp, tp, dp) layout that the GPUs
present can hold, bf16, seq 1024. `--dry` runs the same path on CPU with a shrunken model and a few steps, so
the script is exercised by the tests and does not rot.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
from pathlib import Path

from common import REPO_ROOT, emit, run_training, scratch_dir, steady

GPT2_SMALL = REPO_ROOT / "jobs" / "configs" / "gpt2-small.yaml"
# Model sections over gpt2-small's: the ~1B model is 20 blocks of d=2048 (1.0B weights with the 50k vocab).
MODELS = {"gpt2-small": [], "llama-1b": ["model.n_layer=20", "model.d_model=2048", "model.n_head=16"]}
# (pp, tp, dp) layouts by the GPUs they need; ZeRO-1 over dp wherever dp > 1.
LAYOUTS = {
    1: [(1, 1, 1)],
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    4: [(2, 2, 1), (1, 2, 2), (2, 1, 2)],
    8: [(2, 2, 2), (1, 1, 8)],
}
TARGET_MFU = 0.40


def layouts_for(gpus: int) -> list[tuple[int, int, int]]:
    """Every layout in LAYOUTS that fits on `gpus` GPUs (at least the single-GPU one)."""
    return [layout for need, group in sorted(LAYOUTS.items()) if need <= max(1, gpus) for layout in group]


def common_overrides(work: Path, layout: tuple[int, int, int]) -> list[str]:
    pp, tp, dp = layout
    return [
        f"run.dir={work / 'runs'}",
        f"data.out_dir={work / 'data'}",
        "run.name=gpu-bench",
        f"parallel.pp={pp}",
        f"parallel.tp={tp}",
        f"parallel.dp={dp}",
        f"parallel.zero_stage={int(dp > 1)}",
        "schedule.batch.start=0",
        "checkpoint.every_steps=0",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.log_every=1",
        "fault.max_failures=0",
    ]


def dry_overrides() -> list[str]:
    """CPU, a small slice of the default corpus (prepare takes seconds), a tiny model, 4 steps."""
    stdlib_json = Path(sysconfig.get_paths()["stdlib"]) / "json"
    return [
        f"data.paths=['{stdlib_json}']",
        "parallel.use_gpu=false",
        "train.max_steps=4",
        "train.global_batch=4",
        "parallel.micro_batch=2",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "data.vocab_size=512",
        "data.seq_len=64",
        "model.max_seq_len=64",
        "train.precision=fp32",
    ]


def gpu_overrides(layout: tuple[int, int, int]) -> list[str]:
    """bf16, 64 steps of 32 x 1024 tokens; micro-batches sized so a pipeline gets 4 of them per step."""
    pp, _, dp = layout
    micro_batch = 32 // dp // (4 if pp > 1 else 1)
    return [
        "parallel.use_gpu=true",
        "train.max_steps=64",
        "train.global_batch=32",
        f"parallel.micro_batch={min(16, micro_batch)}",
        "parallel.activation_checkpointing=false",
    ]


def run_layout(model: str, layout: tuple[int, int, int], dry: bool) -> None:
    overrides = common_overrides(scratch_dir("raylm-gpu-bench-"), layout)
    overrides += dry_overrides() if dry else MODELS[model] + gpu_overrides(layout)
    rows, _ = run_training(GPT2_SMALL, overrides)
    skip = 1 if dry else 10
    mfus = [r["mfu"] for r in rows[skip:] if r.get("mfu") is not None]
    emit(
        model=model,
        pp=layout[0],
        tp=layout[1],
        dp=layout[2],
        tokens_per_s=round(steady(rows, "tokens_per_s", skip), 1),
        mfu=round(statistics.median(mfus), 4) if mfus else None,
        peak_mem_gb=round(max(r.get("peak_mem_gb", 0.0) for r in rows), 2),
        steps=len(rows),
        final_loss=round(rows[-1]["loss"], 4),
        dry=dry,
        target_mfu=TARGET_MFU,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry", action="store_true", help="CPU, tiny model, 4 steps, one layout: does it run"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS)
    )
    args = parser.parse_args()
    import torch

    gpus = 0 if args.dry else torch.cuda.device_count()
    models = args.models.split(",")
    for model in models[:1] if args.dry else models:  # dry: the plumbing once, not every model's shape
        for layout in layouts_for(gpus)[:1] if args.dry else layouts_for(gpus):
            run_layout(model, layout, args.dry)


if __name__ == "__main__":
    main()
