"""One process group per single-rank group while an engine is built: DeepSpeed and raylm ask for several of them.

With pp = tp = dp = 1, raylm's TP, DP and PP groups and DeepSpeed's model, data, pipe and slice groups are all
the rank alone: seven `new_group([rank])` calls. Under gloo each group gets its own transport device, whose event
loop thread wakes every 10 ms (docs/ray-facts.md 9): on a CPU node those wake-ups preempt the lock-stepped
intra-op threads of the training step. A group of one rank never communicates, so every request
for the same single rank can share one group; in a world of one rank that is the default group itself.

Only single-rank groups are shared: two groups of several ranks must keep their own sequence of collectives.
Every rank makes the same choices (they depend only on the requested rank lists), so the collective
`new_group` calls stay matched across ranks.

The same interception gives every group created in the block the run's collective timeout (`timeout=` of
`new_group`; torch would give each its 30-minute default): a rank that stops answering then fails its peers'
collectives after that time instead of hanging them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist


@contextlib.contextmanager
def shared_single_rank_groups(timeout: timedelta | None = None) -> Iterator[None]:
    """Within the block, `torch.distributed.new_group(ranks=[r])` returns one group per r (DeepSpeed's calls
    included: they go through torch.distributed.new_group too), and a group created without a timeout gets
    `timeout` (None: torch's default)."""
    create = dist.new_group
    groups: dict[int, object] = {}
    if dist.get_world_size() == 1:
        groups[dist.get_rank()] = dist.group.WORLD

    def new_group(ranks=None, *args, **kwargs):
        members = list(ranks) if ranks is not None else None
        shared = not args and not kwargs and members is not None and len(members) == 1
        if timeout is not None and not args:  # a positional second argument is the caller's own timeout
            kwargs.setdefault("timeout", timeout)
        if not shared:
            return create(ranks, *args, **kwargs)
        if members[0] not in groups:
            groups[members[0]] = create(members, **kwargs)
        return groups[members[0]]

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = create
