"""Process-group rank worker: which groups an engine holds, and how many gloo event-loop threads its rank runs."""

from __future__ import annotations

import os

from dist_parity import global_batches, micro_batches, tiny_cfg


def gloo_loop_threads() -> int:
    """Threads of this process named by gloo's TCP transport (one per transport device, each waking every 10 ms)."""
    tasks = f"/proc/{os.getpid()}/task"
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names.count("gloo_tcp_loop")


def group_timeouts_s() -> dict[str, float]:
    """The collective timeout of every process group this rank is in, keyed "world" or by the group's ranks."""
    import torch
    import torch.distributed as dist

    timeouts = {}
    for group in dist.distributed_c10d._world.pg_map:  # torch has no public list of a rank's groups
        name = "world" if group is dist.group.WORLD else str(dist.get_process_group_ranks(group))
        timeouts[name] = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    return timeouts


def engine_groups(rank: int, world_size: int, layouts: list[tuple], overrides: tuple = ()) -> list[dict]:
    """For each (pp, tp, dp): build the engine, train one step, report its groups' identities, every group's
    collective timeout after the step and the loop threads before the build and after the step."""
    import torch.distributed as dist

    from raylm.parallel.engine import build_engine

    out = []
    for pp, tp, dp in layouts:
        cfg = tiny_cfg(pp, tp, dp, *overrides)
        dist.barrier()  # the default group's own loop thread runs from here on
        before = gloo_loop_threads()
        engine = build_engine(cfg)
        batch = global_batches(cfg, steps=1)[0]
        data = iter(micro_batches(batch, cfg, engine.coords.dp_rank)) if engine.reads_data else None
        loss = engine.train_batch(data)
        groups = {
            "tp": engine.groups.tp,
            "dp": engine.groups.dp,
            "pp": engine.groups.pp,
            "ds_slice": engine.ds.mpu.get_slice_parallel_group() if engine.ds.mpu else None,
        }
        out.append(
            {
                "loss": loss,
                "loop_threads": (before, gloo_loop_threads()),
                "timeouts_s": group_timeouts_s(),
                "sizes": {name: dist.get_world_size(g) for name, g in groups.items() if g is not None},
                "same": {
                    name: [other for other, h in groups.items() if h is g] for name, g in groups.items()
                },
                "world": {name: g is dist.group.WORLD for name, g in groups.items()},
            }
        )
    return out
