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


def engine_groups(rank: int, world_size: int, layouts: list[tuple]) -> list[dict]:
    """For each (pp, tp, dp): build the engine, train one step, report its groups' identities and the loop
    threads before the build and after the step."""
    import torch.distributed as dist

    from raylm.parallel.engine import build_engine

    out = []
    for pp, tp, dp in layouts:
        cfg = tiny_cfg(pp, tp, dp)
        dist.barrier()  # the default group's own loop thread runs from here on
        before = gloo_loop_threads()
        engine = build_engine(cfg)
        batch = global_batches(cfg, steps=1)[0]
        data = iter(micro_batches(batch, cfg, engine.coords.dp_rank)) if engine.reads_data else None
        loss = engine.train_batch(data)
        groups = {"tp": engine.groups.tp, "dp": engine.groups.dp, "pp": engine.groups.pp,
                  "ds_slice": engine.ds.mpu.get_slice_parallel_group() if engine.ds.mpu else None}
        out.append({"loss": loss, "loop_threads": (before, gloo_loop_threads()),
                    "sizes": {name: dist.get_world_size(g) for name, g in groups.items() if g is not None},
                    "same": {name: [other for other, h in groups.items() if h is g] for name, g in groups.items()},
                    "world": {name: g is dist.group.WORLD for name, g in groups.items()}})
    return out
