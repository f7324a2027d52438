"""ASHA's rung decisions handed to the trials: the scheduler publishes each in Ray's internal KV store, and a trial
waits for its own at every rung report, so a stopped trial ends right there, at most one step past the rung.

Without the wait a stopped trial trains on until Tune's stop reaches its workers, which takes seconds: hundreds
of steps of a small model, all past the rung that judged it (docs/ray-facts.md 8). One key per trial and rung,
`rung-decision/<sweep>/<trial id>/<rung tokens>`, holding `continue`, `pause` or `stop`; the trial deletes it once
read. A paused trial waits where it is until Tune ends it (its workers stop; a promotion restarts it from the rung's
checkpoint)."""

from __future__ import annotations

import time

from raylm.config import Config
from raylm.log import get_logger
from raylm.train.elastic import KV_NAMESPACE
from raylm.tune.asha import PAUSE, STOP
WAIT_S = 120.0  # a decision comes within a Train controller poll and a Tune loop; this only guards a lost one
POLL_S = 0.02
PREFIX = "rung-decision"


def decision_key(sweep: str, trial: str, rung_tokens: int) -> str:
    return f"{PREFIX}/{sweep}/{trial}/{int(rung_tokens)}"


def publish(sweep: str, trial: str, rung_tokens: int, action: str, overwrite: bool = True) -> None:
    """The scheduler's side: what the trial does after its report at `rung_tokens`."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(decision_key(sweep, trial, rung_tokens), action, overwrite=overwrite, namespace=KV_NAMESPACE)


def clear(sweep: str) -> None:
    """Drop the sweep's unread decisions (a trial that ended before reading its own)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(f"{PREFIX}/{sweep}/", del_by_prefix=True, namespace=KV_NAMESPACE)


def waits_for_decisions(cfg: Config) -> bool:
    """Trials of an ASHA sweep wait at their rungs; FIFO never stops one and PBT pauses trials itself."""
    return bool(cfg.tune.trial_of) and cfg.tune.scheduler == "asha"


def read_decision(sweep: str, trial: str, rung_tokens: int, wait_s: float = WAIT_S) -> str | None:
    """Rank 0's side: poll for the decision (None when none came within `wait_s`), then delete it."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    key = decision_key(sweep, trial, rung_tokens)
    deadline = time.monotonic() + wait_s
    while True:
        value = _internal_kv_get(key, namespace=KV_NAMESPACE)
        if value is not None:
            _internal_kv_del(key, namespace=KV_NAMESPACE)
            return value.decode()
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def stopped_at_rung(cfg: Config, rank: int, rung_tokens: int, wait_s: float = WAIT_S) -> bool:
    """Whether ASHA stopped this trial at `rung_tokens`: rank 0 waits for the decision and broadcasts it, so every
    rank returns the same answer (a collective). No decision within `wait_s`: the trial goes on, with a warning."""
    import torch.distributed as dist

    choice: list[str | None] = [None]
    if rank == 0:
        choice = [read_decision(cfg.tune.trial_of, cfg.run.name, rung_tokens, wait_s)]
        if choice[0] is None:
            get_logger().warning("no ASHA decision for the rung at %d tokens within %.0f s; this trial goes on",
                                 rung_tokens, wait_s)
        elif choice[0] == STOP:
            get_logger().info("ASHA stopped this trial at its rung of %d tokens; it ends here", rung_tokens)
        elif choice[0] == PAUSE:
            wait_to_be_paused(rung_tokens, wait_s)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0] == STOP


def wait_to_be_paused(rung_tokens: int, wait_s: float = WAIT_S) -> None:
    """Rank 0 of a trial ASHA paused: Tune ends the trial's workers within seconds; the other ranks wait in the
    broadcast meanwhile. A trial still alive after `wait_s` fails, and Tune restarts it from the rung."""
    get_logger().info("ASHA paused this trial at its rung of %d tokens; it goes on from there if promoted", rung_tokens)
    time.sleep(wait_s)
    raise RuntimeError(f"ASHA paused this trial at its rung of {rung_tokens} tokens, but Tune did not end it "
                       f"within {wait_s:.0f} s")
