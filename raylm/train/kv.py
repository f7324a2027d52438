"""Small state shared by a run's processes, in one named Ray actor, and rank 0's read of it for every rank.

The processes are the Tune driver, a Train controller and rank 0 of a worker group; the state is a key/value
map of short strings, and rank0_decides the step where rank 0 reads it and every rank gets the answer.

The actor is detached and found by name, so it outlives whichever process touched it first (a worker group
that Ray stops and restarts, a trial that ends) and is never owned by a process that may die mid-run. The
drivers (`raylm train`, `raylm sweep`) start it on their own node, the head under `ray job submit`, so that
losing a worker node does not lose it. It holds a few short strings per run; each owner of a key prefix
clears it (raylm.train.elastic, raylm.tune.rung_decisions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

ACTOR_NAME = "raylm-kv"
NAMESPACE = "raylm"
T = TypeVar("T")


class KVStore:
    """The map itself, in its actor: string keys and values, no persistence (a run's keys live seconds)."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.items.get(key)

    def put(self, key: str, value: str, overwrite: bool = True) -> bool:
        """Set `key`; with overwrite=False an existing value stays and False comes back."""
        if not overwrite and key in self.items:
            return False
        self.items[key] = value
        return True

    def take(self, key: str) -> str | None:
        """The value of `key`, deleted in the same call (None when unset)."""
        return self.items.pop(key, None)

    def delete_prefix(self, prefix: str) -> None:
        for key in [key for key in self.items if key.startswith(prefix)]:
            del self.items[key]


_handle: tuple[str, object] | None = None  # (Ray job id, actor handle): a new ray.init finds the actor again


def open_kv() -> None:
    """Find the store, or start it on this process's node: the drivers call this right after connecting."""
    _store()


def _store():
    global _handle
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    if _handle is None or _handle[0] != context.get_job_id():
        # on the creator's node (soft: elsewhere if that node is gone), never in its placement group
        here = NodeAffinitySchedulingStrategy(node_id=context.get_node_id(), soft=True)
        actor = ray.remote(num_cpus=0)(KVStore).options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            scheduling_strategy=here,
        )
        _handle = (context.get_job_id(), actor.remote())
    return _handle[1]


def _call(method: str, *args):
    """One call on the store; a store that died (its node lost) is started afresh, once, by this caller."""
    global _handle
    import ray

    try:
        return ray.get(getattr(_store(), method).remote(*args))
    except ray.exceptions.RayActorError:
        _handle = None
        return ray.get(getattr(_store(), method).remote(*args))


def kv_get(key: str) -> str | None:
    return _call("get", key)


def kv_put(key: str, value: str, overwrite: bool = True) -> bool:
    return _call("put", key, value, overwrite)


def kv_take(key: str) -> str | None:
    """The value of `key`, deleted in the same call (None when unset)."""
    return _call("take", key)


def kv_delete_prefix(prefix: str) -> None:
    _call("delete_prefix", prefix)


def rank0_decides(rank: int, decide: Callable[[], T], default: T) -> T:
    """`decide()` on rank 0 only (it may poll the store), its answer returned on every rank: a collective when
    a process group of several ranks is up, so every rank calls it at the same point. An int answer travels as
    one 8-byte tensor (on the GPU under NCCL), anything else pickled; the other ranks pass `default`."""
    import torch
    import torch.distributed as dist

    value = decide() if rank == 0 else default
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    if isinstance(default, int):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        number = torch.tensor([value], device=device)
        dist.broadcast(number, src=0)
        return cast(T, int(number.item()))  # T is int here: `default` is one
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
