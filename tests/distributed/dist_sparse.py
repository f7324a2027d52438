"""Rank workers for sparse fine-tuning: start from a pruned folder, train, checkpoint, resume in another layout."""

from __future__ import annotations

from pathlib import Path

from dist_checkpoint import _state, _train
from dist_parity import STEPS, tiny_cfg

SAVE_STEP = 3  # the checkpoint the other layout resumes from


def train_pruned(
    rank: int, world_size: int, folder: str, layouts: list[tuple], root: str | None
) -> list[dict]:
    """For each (pp, tp, dp, overrides): train STEPS steps from the pruned folder; with `root` the first layout
    also saves checkpoints after SAVE_STEP and STEPS steps there. Losses per rank, final weights from rank 0."""
    from raylm.checkpoint import save_checkpoint
    from raylm.model.weights import starting_weights
    from raylm.parallel.engine import build_engine

    out = []
    for i, (pp, tp, dp, overrides) in enumerate(layouts):
        cfg = tiny_cfg(pp, tp, dp, f"model.init_from={folder}", *overrides)
        engine = build_engine(cfg, starting_weights(cfg))
        losses = _train(engine, cfg, range(SAVE_STEP))
        if root is not None and i == 0:
            save_checkpoint(engine, cfg, Path(root), SAVE_STEP, _state(SAVE_STEP))
        losses += _train(engine, cfg, range(SAVE_STEP, STEPS))
        if root is not None and i == 0:
            save_checkpoint(engine, cfg, Path(root), STEPS, _state(STEPS))
        full = engine.full_state_dict()
        out.append({"losses": losses, "weights": full if rank == 0 else None})
    return out


def resume_elsewhere(rank: int, world_size: int, checkpoint: str, layout: tuple) -> dict:
    """A fresh engine on other seeded weights, without masks, loads the checkpoint and trains the last steps:
    the masks come from the checkpoint alone."""
    from raylm.checkpoint import load_checkpoint
    from raylm.config.derived import padded_vocab
    from raylm.model.weights import SeededInit
    from raylm.parallel.engine import build_engine

    pp, tp, dp, overrides = layout
    cfg = tiny_cfg(pp, tp, dp, *overrides)
    engine = build_engine(cfg, SeededInit(cfg.model, padded_vocab(cfg.data.vocab_size), 99))
    load_checkpoint(engine, cfg, checkpoint)
    losses = _train(engine, cfg, range(SAVE_STEP, STEPS))
    full = engine.full_state_dict()
    return {"losses": losses, "weights": full if rank == 0 else None}


def sparse_world_2(
    rank: int, world_size: int, folder: str, layouts: list[tuple], checkpoint: str, resume_layout: tuple
) -> dict:
    """Both two-rank jobs in one process group."""
    return {
        "train": train_pruned(rank, world_size, folder, layouts, None),
        "resumed": resume_elsewhere(rank, world_size, checkpoint, resume_layout),
    }
