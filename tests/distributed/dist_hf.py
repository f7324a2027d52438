"""Rank worker for the init_from test: build the engine from an export folder and take one training step."""

from __future__ import annotations


def start_from_export(rank: int, world_size: int, jobs: list[tuple]) -> list[dict]:
    """For each (export folder, (pp, tp, dp, overrides)): the step-0 loss and the gathered starting weights."""
    from dist_parity import global_batches, micro_batches, tiny_cfg

    from raylm.model.weights import starting_weights
    from raylm.parallel.engine import build_engine

    out = []
    for folder, (pp, tp, dp, overrides) in jobs:
        cfg = tiny_cfg(pp, tp, dp, f"model.init_from={folder}", *overrides)
        engine = build_engine(cfg, starting_weights(cfg))  # what a training rank builds (Session.build)
        start = {k: v.clone() for k, v in engine.full_state_dict().items()}  # owner ranks get live views
        batch = global_batches(cfg, steps=1)[0]
        data = iter(micro_batches(batch, cfg, engine.coords.dp_rank)) if engine.reads_data else None
        out.append({"loss": engine.train_batch(data), "start": start if rank == 0 else None})
    return out
