"""The scheduler's side of ASHA's rung decisions: publish each one where its trial waits for it.

Each decision goes under its trial's and rung's key in raylm's key-value actor (raylm.train.kv);
raylm.train.rungs, the trial's side, describes the exchange."""

from __future__ import annotations

from raylm.train.kv import kv_delete_prefix, kv_put
from raylm.train.rungs import PREFIX, decision_key


def publish(sweep: str, trial: str, rung_tokens: int, action: str, overwrite: bool = True) -> None:
    """What the trial does after its report at `rung_tokens`."""
    kv_put(decision_key(sweep, trial, rung_tokens), action, overwrite=overwrite)


def clear(sweep: str) -> None:
    """Drop the sweep's unread decisions (a trial that ended before reading its own)."""
    kv_delete_prefix(f"{PREFIX}/{sweep}/")
