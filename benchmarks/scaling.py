"""docs/scaling.md's tables from `raylm plan --json`: model shapes on 8 to 1,024 H100s, published runs, 1,024 GPUs.

For each shape and GPU count the best predicted layout; the same layouts as published runs beside their figures;
and at 1,024 GPUs the checkpoint cost, Young/Daly's interval and goodput. Every number comes from a
`raylm plan ... --json` run this script starts (the commands are printed under each table); the published figures
and the stated assumptions (object-store bandwidth, node MTBF, restart time) are the constants below.
`python benchmarks/scaling.py --markdown` prints the tables; without it, one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import REPO_ROOT, STDOUT
from common import emit as emit_json

from raylm.plan.decide import checkpoint_interval, checkpoint_write_s

CONFIGS = REPO_ROOT / "jobs" / "configs"
GPU_COUNTS = (8, 64, 256, 1024)
MODELS = {  # name: (config, overrides), each at its global batch; 1,024 GPUs take twice the batch (below)
    "gpt2-small": ("gpt2-small.yaml", ["schedule.batch.start=0"]),
    "Llama-3-8B": ("llama3-8b.yaml", []),
    "Llama-3-70B": ("llama3-70b.yaml", []),
}
# MPT-7B's shape: 32 x 4096, 32 heads, 50432 tied vocabulary, seq 2048; its GELU MLP (4d) as a SwiGLU of the
# same parameter count (3 x 10944 ~ 2 x 16384)
MPT_7B = [
    "model.n_kv_head=32",
    "model.ffn_hidden=10944",
    "model.tie_embeddings=true",
    "data.vocab_size=50432",
    "data.seq_len=2048",
    "model.max_seq_len=2048",
    "train.global_batch=1024",
]
# (what, config, overrides, GPUs, (pp, tp, dp, zero) to compare, published tokens/s/GPU or MFU, source)
PUBLISHED = [
    (
        "Llama-3.1-8B, FSDP, bf16",
        "llama3-8b.yaml",
        [],
        8,
        (1, 1, 8, 3),
        ("tokens_per_s_per_gpu", 5762),
        "torchtitan (8 H100, FSDP, bf16): 5,762 tokens/s/GPU",
    ),
    (
        "MPT-7B, FSDP, bf16",
        "llama3-8b.yaml",
        MPT_7B,
        128,
        (1, 1, 128, 3),
        ("mfu", 0.457),
        "llm-foundry (128 H100, FSDP, bf16): 45.7% MFU",
    ),
    (
        "Llama-3-70B, TP4 PP4",
        "llama3-70b.yaml",
        ["train.global_batch=128"],
        64,
        (4, 4, 4, 1),
        ("tokens_per_s_per_gpu", 1524),
        "NeMo 24.12 summary (64 H100, TP4 PP4 CP2 VP5, GBS 128, FP8): 1,524 tokens/s/GPU",
    ),
    (
        "Llama-3-70B, TP4 PP8",
        "llama3-70b.yaml",
        ["train.global_batch=128"],
        64,
        (8, 4, 2, 1),
        ("tokens_per_s_per_gpu", 1524),
        "the same published run (its TP4 PP4 CP2 VP5 layout; TP4 PP8 is the FP8 recipe's)",
    ),
]
WRITER_BW = 2e9  # bytes/s one writing rank reaches to object storage (multipart uploads from one node)
NODE_MTBF_H = (
    6000.0  # one 8-GPU node; Llama 3's 419 unexpected interruptions in 54 days on 2,048 nodes: ~6,300 h
)
RESTART_S = 600.0  # a new worker group after a failure, before the checkpoint is read back
GPUS_PER_NODE = 8


def plan_rows(config: str, overrides: list[str], gpus: int) -> tuple[str, list[dict]]:
    command = ["raylm", "plan", f"jobs/configs/{config}", *overrides, "--gpus", str(gpus), "--gpu", "h100"]
    proc = subprocess.run(
        [sys.executable, "-m", "raylm.cli", *command[1:], "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return " ".join(command), [json.loads(line) for line in proc.stdout.splitlines()]


MARKDOWN = False  # --markdown: the tables of docs/scaling.md; else one JSON object per row


def emit(**fields) -> None:
    if not MARKDOWN:
        emit_json(**fields)


def md(text: str) -> None:
    if MARKDOWN:
        print(text, file=STDOUT)


def layout_text(row: dict) -> str:
    ckpt = ", ckpt" if row["activation_checkpointing"] else ""
    cp = f" cp{row['cp']}" if row.get("cp", 1) > 1 else ""
    return f"pp{row['pp']}{cp} tp{row['tp']} dp{row['dp']}, ZeRO-{row['zero_stage']}, mb {row['micro_batch']}{ckpt}"


def best_tables() -> dict[str, dict]:
    """The best layout per model and GPU count; returns the 1,024-GPU rows for the checkpoint table."""
    md("| model | GPUs | best layout | GB/GPU | tokens/s/GPU | MFU | bubble | step s |")
    md("|---|---|---|---|---|---|---|---|")
    commands, at_1024 = [], {}
    for name, (config, overrides) in MODELS.items():
        for gpus in GPU_COUNTS:
            extra = [f"train.global_batch={1024 if name != 'gpt2-small' else 512}"] if gpus == 1024 else []
            command, rows = plan_rows(config, [*overrides, *extra], gpus)
            commands.append(command)
            best = rows[0]
            emit(table="best", model=name, gpus=gpus, command=command, **best)
            if not best["fits"]:
                md(f"| {name} | {gpus} | none fits: {best['why']} | | | | | |")
                continue
            md(
                f"| {name} | {gpus} | {layout_text(best)} | {best['mem_per_rank_gb']:.1f} | "
                f"{best['tokens_per_s_per_rank']:,.0f} | {best['mfu']:.1%} | {best['bubble']:.1%} | "
                f"{best['step_s']:.3g} |"
            )
            if gpus == 1024:
                at_1024[name] = best
    md("\nPrinted by:\n\n```")
    md("\n".join(commands))
    md("```\n")
    return at_1024


def published_table() -> None:
    md("| run | published | raylm's prediction, same layout | predicted / published | GB/GPU |")
    md("|---|---|---|---|---|")
    commands = []
    for what, config, overrides, gpus, layout, (figure, value), source in PUBLISHED:
        command, rows = plan_rows(config, overrides, gpus)
        commands.append(command)
        same = [r for r in rows if r["fits"] and (r["pp"], r["tp"], r["dp"], r["zero_stage"]) == layout]
        if not same:
            emit(table="published", run=what, source=source, command=command, fits=False)
            md(f"| {what} | {source} | the layout does not fit | | |")
            continue
        row = max(same, key=lambda r: r["tokens_per_s"])
        ours = row["tokens_per_s_per_rank"] if figure == "tokens_per_s_per_gpu" else row["mfu"]
        emit(
            table="published",
            run=what,
            source=source,
            figure=figure,
            published=value,
            predicted=ours,
            ratio=round(ours / value, 3),
            command=command,
            **row,
        )
        shown = f"{ours:,.0f} tokens/s/GPU" if figure == "tokens_per_s_per_gpu" else f"{ours:.1%} MFU"
        md(
            f"| {what} | {source} | {shown} ({layout_text(row)}) | {ours / value:.2f} | "
            f"{row['mem_per_rank_gb']:.1f} |"
        )
    md("\nPrinted by:\n\n```")
    md("\n".join(commands))
    md("```\n")


def checkpoint_table(at_1024: dict[str, dict]) -> None:
    md(
        "| model (1,024 H100) | checkpoint | write time | Young/Daly interval | failures/day | "
        "time saving | time redone | restarts | goodput |"
    )
    md("|---|---|---|---|---|---|---|---|---|")
    nodes = 1024 // GPUS_PER_NODE
    for name, row in at_1024.items():
        nbytes, write_s = checkpoint_write_s(row["parameters"], row["pp"], WRITER_BW)
        restart_s = RESTART_S + write_s  # reading it back takes about as long as writing it
        choice = checkpoint_interval(write_s, row["step_s"], NODE_MTBF_H, nodes, restart_s)
        emit(
            table="checkpoint_1024",
            model=name,
            checkpoint_gb=round(nbytes / 1e9, 1),
            write_s=round(write_s, 1),
            writers=row["pp"],
            interval_steps=choice.steps,
            interval_s=round(choice.interval_s, 1),
            failures_per_day=round(choice.failures_per_day, 3),
            save_frac=round(choice.save_frac, 4),
            rework_frac=round(choice.rework_frac, 4),
            restart_frac=round(choice.restart_frac, 4),
            goodput=round(choice.goodput, 4),
        )
        md(
            f"| {name} ({layout_text(row)}) | {nbytes / 1e9:,.0f} GB | {write_s:,.0f} s ({row['pp']} writers) | "
            f"{choice.steps:,} steps ({choice.interval_s / 60:,.0f} min) | {choice.failures_per_day:.2f} | "
            f"{choice.save_frac:.2%} | {choice.rework_frac:.2%} | {choice.restart_frac:.2%} | "
            f"{choice.goodput:.1%} |"
        )


def main() -> None:
    global MARKDOWN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--markdown", action="store_true", help="print docs/scaling.md's tables, not JSON lines"
    )
    MARKDOWN = parser.parse_args().markdown
    at_1024 = best_tables()
    published_table()
    checkpoint_table(at_1024)


if __name__ == "__main__":
    main()
