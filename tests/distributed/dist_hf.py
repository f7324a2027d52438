"""Rank worker for the init_from tests: build the engine from a Hugging Face folder and take training steps."""

from __future__ import annotations


def start_from_export(rank: int, world_size: int, jobs: list[tuple]) -> list[dict]:
    """For each (folder, (pp, tp, dp, overrides), steps): the losses of `steps` steps on one batch (so they
    fall) from the folder's weights, and the gathered starting weights."""
    from dist_parity import global_batches, micro_batches, tiny_cfg

    from raylm.model.weights import starting_weights
    from raylm.parallel.engine import build_engine

    out = []
    for folder, (pp, tp, dp, overrides), steps in jobs:
        cfg = tiny_cfg(pp, tp, dp, f"model.init_from={folder}", *overrides)
        engine = build_engine(cfg, starting_weights(cfg))  # what a training rank builds (Session.build)
        start = {k: v.clone() for k, v in engine.full_state_dict().items()}  # owner ranks get live views
        losses = []
        for batch in global_batches(cfg, steps=1) * steps:
            data = iter(micro_batches(batch, cfg, engine.coords.dp_rank)) if engine.reads_data else None
            losses.append(engine.train_batch(data))
        out.append({"losses": losses, "start": start if rank == 0 else None})
    return out
