"""Step-guard rank worker: one poisoned micro-batch on one rank, skipped by every rank before the optimizer step."""

from __future__ import annotations

from dist_parity import global_batches, micro_batches, tiny_cfg


def poisoned_step_leaves_no_trace(rank: int, world_size: int, layouts: list[tuple]) -> list[dict]:
    """For each (pp, tp, dp, overrides): train batches 0, 1 (poisoned on the last rank), 2, and separately 0, 2.
    A skipped step must leave weights, AdamW state and DeepSpeed's counters as if batch 1 never came."""
    from raylm.parallel.engine import build_engine

    out = []
    for pp, tp, dp, overrides in layouts:
        cfg = tiny_cfg(pp, tp, dp, *overrides)
        batches = global_batches(cfg, steps=3)
        runs = {}
        for name, order in (("poisoned", (0, 1, 2)), ("clean", (0, 2))):
            engine = build_engine(cfg)
            losses, flags = [], []
            for index in order:
                if name == "poisoned" and index == 1 and rank == world_size - 1:
                    engine.poison_next_loss()
                data = (
                    iter(micro_batches(batches[index], cfg, engine.coords.dp_rank))
                    if engine.reads_data
                    else None
                )
                losses.append(engine.train_batch(data))
                flags.append(engine.take_nonfinite_flags())
            scalars = engine.save_state(lambda index, weights, moments: None)
            runs[name] = {
                "losses": losses,
                "flags": flags,
                "weights": engine.full_state_dict(),
                "adam_step": scalars["adam_step"],
                "skipped_steps": scalars["skipped_steps"],
                "computes_loss": engine.computes_loss,
            }
        out.append(runs)
    return out
