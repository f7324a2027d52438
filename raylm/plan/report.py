"""How `raylm plan` shows its predictions: one JSON object per layout, or a ranked table and the best layout's
overrides."""

from __future__ import annotations

from typing import Any

from raylm.plan.predict import GB, Prediction


def as_json(pred: Prediction) -> dict[str, Any]:
    """One layout's row: its degrees, whether it fits (and why not), memory in GB by part, time and speed."""
    row: dict[str, Any] = {
        "pp": pred.pp,
        "tp": pred.tp,
        "dp": pred.dp,
        "cp": pred.cp,
        "zero_stage": pred.zero_stage,
        "ds_zero_stage": pred.ds_zero_stage,
        "micro_batch": pred.micro_batch,
        "activation_checkpointing": pred.activation_checkpointing,
        "micro_batches": pred.micro_batches,
        "valid": pred.valid,
        "fits": pred.fits,
        "why": pred.why,
        "parameters": pred.parameters,
    }
    mem, time = pred.memory, pred.time
    if mem is None or time is None:
        return row
    row.update(
        {
            "params_gb": _gb(mem.params),
            "grads_gb": _gb(mem.grads),
            "optimizer_gb": _gb(mem.optimizer),
            "activations_gb": _gb(mem.activations),
            "buffers_gb": _gb(mem.buffers),
            "framework_gb": _gb(mem.framework),
            "mem_per_rank_gb": _gb(mem.total),
            "mem_limit_gb": _gb(pred.mem_limit),
            "largest_stage": mem.stage,
            "step_s": round(time.total, 6),
            "compute_s": round(time.compute_s, 6),
            "bubble_s": round(time.bubble_s, 6),
            "tp_comm_s": round(time.tp_s, 6),
            "p2p_s": round(time.p2p_s, 6),
            "cp_comm_s": round(time.cp_s, 6),
            "dp_comm_s": round(time.dp_s, 6),
            "optimizer_s": round(time.optimizer_s, 6),
            "bubble": round(time.bubble, 4),
            "tokens_per_s": round(pred.tokens_per_s, 1),
            "tokens_per_s_per_rank": round(pred.tokens_per_s / (pred.pp * pred.cp * pred.tp * pred.dp), 1),
            "mfu": round(pred.mfu, 4),
        }
    )
    return row


def _gb(nbytes: float) -> float:
    return round(nbytes / GB, 3)


HEADER = (
    "#",
    "pp",
    "cp",
    "tp",
    "dp",
    "zero",
    "mb",
    "ckpt",
    "m",
    "GB/rank",
    "tokens/s",
    "MFU",
    "bubble",
    "step s",
)


def table(ranked: list[Prediction], top: int) -> list[str]:
    """The `top` best fitting layouts, then those that do not fit and those the config refuses, counted, with
    the first reasons."""
    fitting = [p for p in ranked if p.fits][:top]
    rows = [HEADER] + [_cells(i + 1, p) for i, p in enumerate(fitting)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    too_big = [p for p in ranked if p.valid and not p.fits]
    refused = [p for p in ranked if not p.valid]
    shown = len(fitting)
    total_fit = sum(1 for p in ranked if p.fits)
    if total_fit > shown:
        lines.append(f"... {total_fit - shown} more that fit (--top N shows more, --json all)")
    if too_big:
        smallest = too_big[0]
        lines.append(
            f"out: {len(too_big)} layouts do not fit; the smallest, {_degrees(smallest)}: {smallest.why}"
        )
    reasons: dict[str, Prediction] = {}
    for p in refused:
        reasons.setdefault(p.why.split(";")[0], p)
    for reason, p in list(reasons.items())[:6]:
        lines.append(f"out: {_degrees(p)}: {reason}")
    if len(reasons) > 6:
        lines.append(f"out: {len(reasons) - 6} more reasons (--json lists every layout)")
    return lines


def _degrees(p: Prediction) -> str:
    return f"pp={p.pp} cp={p.cp} tp={p.tp} dp={p.dp} zero={p.zero_stage} mb={p.micro_batch}"


def _cells(rank: int, p: Prediction) -> tuple[str, ...]:
    assert p.memory is not None and p.time is not None
    return (
        str(rank),
        str(p.pp),
        str(p.cp),
        str(p.tp),
        str(p.dp),
        str(p.zero_stage),
        str(p.micro_batch),
        "on" if p.activation_checkpointing else "off",
        str(p.micro_batches),
        f"{p.memory.total / GB:.2f}",
        f"{p.tokens_per_s:,.0f}",
        f"{p.mfu:.1%}",
        f"{p.time.bubble:.1%}",
        f"{p.time.total:.3g}",
    )
