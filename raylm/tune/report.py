"""A sweep's human-readable outputs: sweep.png (metric vs tokens, rungs, lr x batch heat map) and sweep.md."""

from __future__ import annotations

import math
from pathlib import Path

from raylm.train.metrics import read_metrics
from raylm.tune.plan import SweepPlan
from raylm.tune.results import TrialRecord, finite

END_MARKS = {"stopped": "x", "diverged": "*", "error": "s", "unfinished": ">", "finished": "o"}


def write_markdown(records: list[TrialRecord], plan: SweepPlan, metric: str, path: Path) -> None:
    """Trials sorted by metric, then what the sweep spent against running every trial to the budget."""
    spent = sum(r.tokens for r in records)
    full = plan.budget_tokens * len(records)
    wall = sum(r.wall_s for r in records)
    wall_full = sum(r.wall_s * plan.budget_tokens / r.tokens for r in records if r.tokens)
    ranked = sorted(records, key=lambda r: (r.last is None, r.last if r.last is not None else 0.0))
    keys = sorted({key for r in records for key in r.params})
    rungs = ", ".join(f"{m:,}" for m in plan.milestones_tokens)
    lines = [
        f"# Sweep {plan.name}",
        "",
        f"Budget {plan.budget_tokens:,} tokens per trial; rungs at {rungs} tokens; every trial validates on the "
        f"same {plan.eval_samples} samples.",
        "",
        f"| rank | trial | status | tokens | {metric} | best | {' | '.join(keys)} |",
        "|" + "---|" * (6 + len(keys)),
    ]
    for rank, r in enumerate(ranked, 1):
        values = " | ".join(_fmt(r.params.get(key)) for key in keys)
        lines.append(
            f"| {rank} | {r.name} | {r.status} | {r.tokens:,} | {_fmt(r.last)} | {_fmt(r.best)} | {values} |"
        )
    lines += [
        "",
        f"Tokens trained: {spent:,} of {full:,} ({spent / max(1, full):.1%}) that running every trial "
        f"to the budget would take.",
        f"Wall-seconds in trials: {wall:.0f} of about {wall_full:.0f} ({wall / max(1e-9, wall_full):.1%}; "
        f"each trial's time extrapolated at its own tokens/s).",
        "",
    ]
    path.write_text("\n".join(lines))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plot_sweep(records: list[TrialRecord], plan: SweepPlan, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = _heat_cells(records)
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(13 if heat else 8, 5), squeeze=False)
    ax = axes[0][0]
    for record in records:
        rows = [r for r in read_metrics(Path(record.folder)) if finite(r.get("val_loss")) is not None]
        if not rows:
            continue
        tokens, values = [r["tokens"] for r in rows], [r["val_loss"] for r in rows]
        (line,) = ax.plot(tokens, values, linewidth=1, label=f"{record.name[-11:]} ({record.status})")
        ax.plot(tokens[-1], values[-1], END_MARKS[record.status], color=line.get_color(), markersize=8)
    for milestone in plan.milestones_tokens:
        ax.axvline(milestone, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(plan.budget_tokens, color="black", linewidth=0.8)
    ax.set_xlabel("tokens trained (dashed: rungs, solid: budget)")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {plan.name}: x = stopped, * = diverged")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if heat:
        _draw_heat(axes[0][1], heat, metric)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _heat_cells(records: list[TrialRecord]) -> dict | None:
    """(lr bin, batch) -> best final metric, when both optim.lr and train.global_batch were searched."""
    points = [
        (r.params["optim.lr"], r.params["train.global_batch"], r.last)
        for r in records
        if "optim.lr" in r.params and "train.global_batch" in r.params and r.last is not None
    ]
    if not points:
        return None
    lrs = sorted({p[0] for p in points})
    batches = sorted({p[1] for p in points})
    if len(lrs) > 8:  # sampled lrs: 8 log-spaced bins
        low, high = math.log10(lrs[0]), math.log10(lrs[-1]) + 1e-12
        edges = [10 ** (low + (high - low) * k / 8) for k in range(9)]
        lrs = [math.sqrt(edges[k] * edges[k + 1]) for k in range(8)]
        bin_of = lambda lr: lrs[min(7, int((math.log10(lr) - low) / (high - low) * 8))]  # noqa: E731
    else:
        bin_of = lambda lr: lr  # noqa: E731
    cells: dict = {}
    for lr, batch, value in points:
        key = (bin_of(lr), batch)
        cells[key] = min(value, cells.get(key, math.inf))
    return {"lrs": lrs, "batches": batches, "cells": cells}


def _draw_heat(ax, heat: dict, metric: str) -> None:
    import numpy as np

    grid = np.full((len(heat["batches"]), len(heat["lrs"])), np.nan)
    for (lr, batch), value in heat["cells"].items():
        grid[heat["batches"].index(batch), heat["lrs"].index(lr)] = value
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(heat["lrs"])), [f"{lr:.1e}" for lr in heat["lrs"]], rotation=45, fontsize=7)
    ax.set_yticks(range(len(heat["batches"])), [str(b) for b in heat["batches"]])
    ax.set_xlabel("optim.lr")
    ax.set_ylabel("train.global_batch")
    ax.set_title(f"last {metric} (a stopped trial: at its stop; blank: no trial)")
    ax.figure.colorbar(image, ax=ax)
