"""The trial side of ASHA's rung decisions: a trial waits at each rung for the scheduler's decision.

At every rung report rank 0 of a trial waits for the decision the sweep's scheduler published for it
(raylm.tune.rung_decisions) and every rank gets it, so a stopped trial ends right there, at most one step
past the rung.

Without the wait a stopped trial trains on until Tune's stop reaches its workers, which takes seconds:
hundreds of steps of a small model, all past the rung that judged it (docs/ray-facts.md 8). One key per trial
and rung, `rung-decision/<sweep>/<trial id>/<rung tokens>` in raylm's key-value actor (raylm.train.kv),
holding `continue`, `pause` or `stop`; the trial deletes it once read. A paused trial waits where it is until
Tune ends it (its workers stop; a promotion restarts it from the rung's checkpoint).

Tune may end a paused trial before its rank 0 has read `pause`; the promoted restart reports that rung again,
so rank 0 drops whatever an earlier attempt left under the rung's key before each rung report
(forget_decision): it then waits for the decision on this report, never takes the stale one."""

from __future__ import annotations

import time

from raylm.config import Config
from raylm.log import get_logger
from raylm.train.kv import kv_take, rank0_decides

CONTINUE, PAUSE, STOP = "continue", "pause", "stop"  # what a trial does after its report at a rung
WAIT_S = 120.0  # a decision comes within a Train controller poll and a Tune loop; this only guards a lost one
POLL_S = 0.1  # each poll is a call on the store actor: a decision waits at most this much longer
PREFIX = "rung-decision"


def decision_key(sweep: str, trial: str, rung_tokens: int) -> str:
    return f"{PREFIX}/{sweep}/{trial}/{int(rung_tokens)}"


def waits_for_decisions(cfg: Config) -> bool:
    """Trials of an ASHA sweep wait at their rungs; FIFO never stops one and PBT pauses trials itself."""
    return bool(cfg.tune.trial_of) and cfg.tune.scheduler == "asha"


def forget_decision(cfg: Config, rank: int, rung_tokens: int) -> None:
    """Before a rung report (rank 0; the others do nothing): drop a decision an earlier attempt of this trial
    never read. The scheduler publishes only after it receives the report, so nothing it decides is lost."""
    if rank == 0:
        kv_take(decision_key(cfg.tune.trial_of, cfg.run.name, rung_tokens))


def read_decision(sweep: str, trial: str, rung_tokens: int, wait_s: float = WAIT_S) -> str | None:
    """Rank 0's side: poll for the decision (None when none came within `wait_s`), then delete it."""
    key = decision_key(sweep, trial, rung_tokens)
    deadline = time.monotonic() + wait_s
    while True:
        value = kv_take(key)
        if value is not None:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def stopped_at_rung(cfg: Config, rank: int, rung_tokens: int, wait_s: float = WAIT_S) -> bool:
    """Whether ASHA stopped this trial at `rung_tokens`: rank 0 waits for the decision and broadcasts it, so
    every rank returns the same answer (a collective). No decision within `wait_s`: the trial goes on, with a
    warning."""
    choice = rank0_decides(rank, lambda: _rank0_choice(cfg, rung_tokens, wait_s), default=None)
    return choice == STOP


def _rank0_choice(cfg: Config, rung_tokens: int, wait_s: float) -> str | None:
    choice = read_decision(cfg.tune.trial_of, cfg.run.name, rung_tokens, wait_s)
    if choice is None:
        get_logger().warning(
            "no ASHA decision for the rung at %d tokens within %.0f s; this trial goes on",
            rung_tokens,
            wait_s,
        )
    elif choice == STOP:
        get_logger().info("ASHA stopped this trial at its rung of %d tokens; it ends here", rung_tokens)
    elif choice == PAUSE:
        wait_to_be_paused(rung_tokens, wait_s)
    return choice


def wait_to_be_paused(rung_tokens: int, wait_s: float = WAIT_S) -> None:
    """Rank 0 of a trial ASHA paused: Tune ends the trial's workers within seconds; the other ranks wait in
    the broadcast meanwhile. A trial still alive after `wait_s` fails, and Tune restarts it from the rung."""
    get_logger().info(
        "ASHA paused this trial at its rung of %d tokens; it goes on from there if promoted", rung_tokens
    )
    time.sleep(wait_s)
    raise RuntimeError(
        f"ASHA paused this trial at its rung of {rung_tokens} tokens, but Tune did not end it "
        f"within {wait_s:.0f} s"
    )
