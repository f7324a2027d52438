"""Elastic DP on the workers: each worker group's dp, and the handshake that commits a checkpoint before a resize.

Ray Train resizes an elastic worker group by stopping it and starting one of the new size, and the new group
resumes from the newest committed checkpoint. So that growing (or shrinking) a healthy group loses and repeats
no step, raylm's scaling policy (raylm.train.scaling_policy) does not resize a running group at once. It asks
first, over Ray's internal key-value store (one channel per run, keys `<channel>/request|ready|release`):

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

import torch

from raylm.config import Config
from raylm.config.derived import dp_sizes, is_elastic, replica_workers
from raylm.errors import ConfigError
from raylm.log import get_logger

KV_NAMESPACE = "raylm"
WAIT_FOR_RESIZE_S = 120.0  # the policy answers within a controller poll (2 s by default); this only guards a lost one
POLL_S = 0.1


def config_for_group(cfg: Config, world_size: int) -> Config:
    """The run's config with parallel.dp set to the DP replicas this worker group holds (elastic runs only)."""
    if not is_elastic(cfg.parallel):
        return cfg
    dp, extra = divmod(world_size, replica_workers(cfg.parallel))
    if extra or dp not in dp_sizes(cfg.parallel):  # the scaling policy proposes only whole replicas in the range
        raise ConfigError(f"a worker group of {world_size} workers is not a whole number of DP replicas of "
                          f"pp * tp = {replica_workers(cfg.parallel)} workers within parallel.dp=[{cfg.parallel.dp_min}, "
                          f"{cfg.parallel.dp_max}]")
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp))


class ResizeChannel:
    """The three counters of one run's resize handshake in Ray's internal KV store (0 when unset)."""

    def __init__(self, name: str):
        self.name = name

    def read(self, field: str) -> int:
        from ray.experimental.internal_kv import _internal_kv_get

        value = _internal_kv_get(f"{self.name}/{field}", namespace=KV_NAMESPACE)
        return int(value) if value else 0

    def write(self, field: str, number: int) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(f"{self.name}/{field}", str(number), namespace=KV_NAMESPACE)

    def clear(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(f"{self.name}/", del_by_prefix=True, namespace=KV_NAMESPACE)


class ResizeHandshake:
    """A worker's side of the handshake; every rank calls requested() after every step, in the same order."""

    def __init__(self, channel: ResizeChannel, rank: int):
        self.channel, self.rank = channel, rank
        self.handled = 0

    def requested(self) -> bool:
        """True on every rank when the policy asked for a checkpoint this group has not yet answered (a collective)."""
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        request = torch.tensor([self.channel.read("request") if self.rank == 0 else 0], device=device)
        dist.broadcast(request, src=0)
        number = int(request.item())
        if number <= self.handled:
            return False
        self.handled = number
        return True

    def wait_for_resize(self, step: int) -> None:
        """Say the checkpoint of `step` is committed, then wait until Ray stops this group or the policy lets it go
        on (every rank returns together)."""
        import torch.distributed as dist

        if self.rank == 0:
            get_logger().info("step %d: checkpoint committed for a worker-group resize; waiting for Ray", step + 1)
            self.channel.write("ready", self.handled)
            deadline = time.monotonic() + WAIT_FOR_RESIZE_S
            while self.channel.read("release") < self.handled and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if self.channel.read("release") < self.handled:
                get_logger().warning("no resize came within %.0f s; training goes on at this size", WAIT_FOR_RESIZE_S)
        dist.barrier()
