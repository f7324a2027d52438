"""Seconds this rank spends blocked in torch.distributed calls, and the call it is blocked in now (for hang reports).

A rank's step time alone cannot name a straggler: ranks run in lock step, so every rank's step lasts as long as
the slowest one's, the others waiting for it inside their collectives. What differs is the time each rank spends
*outside* them: its work. So the blocking entry points of torch.distributed that DeepSpeed and raylm go through
(DeepSpeed's comm layer looks them up on the module at every call) are wrapped once per process, timed by a
WaitClock: two clock reads per call on CPU, a pair of CUDA events on a GPU. Calls with `async_op=True` return at
once and are not timed (their wait happens in `Work.wait()`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from raylm.parallel.wait_clock import WaitClock

BLOCKING_CALLS = (
    "all_reduce",
    "broadcast",
    "send",
    "recv",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


@dataclass(frozen=True)
class InFlight:
    """The torch.distributed call a rank is blocked in: its name, the global ranks of its group, since when."""

    call: str
    group_ranks: tuple[int, ...]
    since: float  # time.monotonic()


class CommClock:
    """The process's one clock of blocking torch.distributed calls (`installed()` wraps them the first time)."""

    _installed: CommClock | None = None

    def __init__(self) -> None:
        self.clock = WaitClock()
        self.in_flight: InFlight | None = None  # read by the hang watch's thread
        self._depth = threading.local()  # all_gather_object calls all_gather: only the outer call counts

    @classmethod
    def installed(cls) -> CommClock:
        if cls._installed is None:
            cls._installed = clock = cls()
            for name in BLOCKING_CALLS:
                if hasattr(dist, name):
                    setattr(dist, name, clock._wrap(name, getattr(dist, name)))
        return cls._installed

    def _wrap(self, name: str, call: Callable) -> Callable:
        timed = self.clock.timed(call)

        def wrapped(*args, **kwargs):
            if kwargs.get("async_op") or getattr(self._depth, "value", 0):
                return call(*args, **kwargs)
            self._depth.value = 1
            self.in_flight = InFlight(name, _peers(name, args, kwargs), time.monotonic())
            try:
                result = timed(*args, **kwargs)
            finally:
                self._depth.value = 0
            self.in_flight = None  # kept when the call raised: the hang report names the call that timed out
            return result

        wrapped.__wrapped__ = call  # type: ignore[attr-defined]
        return wrapped

    def take_wait_s(self) -> float:
        """Seconds blocked in torch.distributed calls since the last take."""
        return self.clock.take_wait_s()


def _peers(name: str, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The global ranks a call waits on: the other end of a send or recv, else its group's ranks."""
    if name in ("send", "recv"):
        peer = kwargs.get("dst", kwargs.get("src", args[1] if len(args) > 1 else None))
        return () if peer is None else (int(peer),)
    return _group_ranks(kwargs.get("group"))


def _group_ranks(group) -> tuple[int, ...]:
    """The global ranks of a call's group (the whole world for the default group)."""
    try:
        if group is None or group is dist.GroupMember.WORLD:
            return tuple(range(dist.get_world_size()))
        return tuple(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError):  # no process group yet, or a group this rank is not in
        return ()
