"""Layout-free checkpoints: full per-layer state files, an atomic manifest-last commit, resume picking and export.

    from raylm.checkpoint import save_checkpoint, load_checkpoint, resume_candidates, prune, capture_rng
    from raylm.checkpoint.export import export, load_export

Nothing in this package imports DeepSpeed: an engine's state goes through Engine.save_state / load_state.
"""

from __future__ import annotations

from raylm.checkpoint.commit import (
    list_checkpoints,
    list_committed,
    pick_resume,
    prune,
    resume_candidates,
    step_dir_name,
)
from raylm.checkpoint.manifest import verify_checkpoint
from raylm.checkpoint.reader import load_checkpoint_weights, resolve_checkpoint
from raylm.checkpoint.rng import capture_rng, restore_rng
from raylm.checkpoint.state import Resumed, load_checkpoint, save_checkpoint, verify_for_load
from raylm.checkpoint.writer import save_full_weights

__all__ = [
    "list_checkpoints",
    "list_committed",
    "pick_resume",
    "resume_candidates",
    "prune",
    "step_dir_name",
    "verify_checkpoint",
    "load_checkpoint_weights",
    "resolve_checkpoint",
    "capture_rng",
    "restore_rng",
    "Resumed",
    "load_checkpoint",
    "save_checkpoint",
    "verify_for_load",
    "save_full_weights",
]
