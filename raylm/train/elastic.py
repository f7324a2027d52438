"""Elastic DP on the workers: each worker group's dp, and the handshake that commits a checkpoint before a resize.

Ray Train resizes an elastic worker group by stopping it and starting one of the new size, and the new group
resumes from the newest committed checkpoint. So that growing (or shrinking) a healthy group loses and repeats
no step, raylm's scaling policy (raylm.train.scaling_policy) does not resize a running group at once. It asks
first, over raylm's key-value actor (raylm.train.kv): one channel per run, keys
`<channel>/request|ready|release`.

1. The policy sees room for another number of whole DP replicas and writes request=N (N counts up).
2. After each step rank 0 reads `request` and broadcasts it to every rank (one 8-byte collective per step, in
   elastic runs only). On a new N every rank commits a checkpoint of this step (unless one was due anyway) and
   reports it; rank 0 writes ready=N, and every rank waits.
3. The policy, seeing ready=N, counts the cluster again: when another size still fits it returns Ray's resize
   decision and Ray stops the waiting group; the new group resumes from that checkpoint at the next step.
   Otherwise it writes release=N and the group trains on.

A lost node is no resize but a failure: its workers die mid-step, Ray restarts the group at the size that fits
(fault.max_failures counts it) and the steps after the newest checkpoint run again, each logged once.
"""

from __future__ import annotations

import dataclasses
import time

from raylm.config import Config
from raylm.config.layout import Layout
from raylm.log import get_logger
from raylm.train.kv import kv_delete_prefix, kv_get, kv_put, rank0_decides

WAIT_FOR_RESIZE_S = (
    120.0  # the policy answers within a controller poll (2 s by default); this only guards a lost one
)
POLL_S = 0.1


def config_for_group(cfg: Config, world_size: int) -> Config:
    """The run's config with parallel.dp set to the DP replicas this worker group holds (elastic runs only)."""
    layout = Layout.of(cfg.parallel)
    if not layout.elastic:
        return cfg
    dp = layout.dp_of_group(world_size)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))


class ResizeChannel:
    """The three counters of one run's resize handshake in raylm's key-value actor (0 when unset)."""

    def __init__(self, name: str):
        self.name = name

    def read(self, field: str) -> int:
        value = kv_get(f"{self.name}/{field}")
        return int(value) if value else 0

    def write(self, field: str, number: int) -> None:
        kv_put(f"{self.name}/{field}", str(number))

    def clear(self) -> None:
        kv_delete_prefix(f"{self.name}/")


class ResizeHandshake:
    """A worker's side of the handshake; every rank calls requested() after every step, in the same order."""

    def __init__(self, channel: ResizeChannel, rank: int):
        self.channel, self.rank = channel, rank
        self.handled = 0

    def requested(self) -> bool:
        """True on every rank when the policy asked for a checkpoint this group has not yet answered (a collective)."""
        number = rank0_decides(self.rank, lambda: self.channel.read("request"), default=0)
        if number <= self.handled:
            return False
        self.handled = number
        return True

    def wait_for_resize(self, step: int) -> None:
        """Say the checkpoint of `step` is committed, then wait until Ray stops this group or the policy lets it go
        on (every rank returns together)."""
        import torch.distributed as dist

        if self.rank == 0:
            get_logger().info(
                "step %d: checkpoint committed for a worker-group resize; waiting for Ray", step + 1
            )
            self.channel.write("ready", self.handled)
            deadline = time.monotonic() + WAIT_FOR_RESIZE_S
            while self.channel.read("release") < self.handled and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if self.channel.read("release") < self.handled:
                get_logger().warning(
                    "no resize came within %.0f s; training goes on at this size", WAIT_FOR_RESIZE_S
                )
        dist.barrier()
