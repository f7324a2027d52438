"""Layout-free checkpoints: full per-layer state files, an atomic manifest-last commit, resume picking and export.

    from raylm.checkpoint import save_checkpoint, load_checkpoint, pick_resume, prune, capture_rng
    from raylm.checkpoint.export import export, load_export

Engine-side functions (save_checkpoint, load_checkpoint) import DeepSpeed and load on first use; the folder
protocol and export do not need it.
"""

from __future__ import annotations

from importlib import import_module

from raylm.checkpoint.commit import list_checkpoints, list_committed, pick_resume, prune, step_dir_name
from raylm.checkpoint.manifest import verify_checkpoint
from raylm.checkpoint.reader import load_checkpoint_weights, resolve_checkpoint
from raylm.checkpoint.rng import capture_rng, restore_rng

_LAZY = {"save_checkpoint": "raylm.checkpoint.state", "load_checkpoint": "raylm.checkpoint.state",
         "Resumed": "raylm.checkpoint.state",
         "load_export": "raylm.checkpoint.export", "save_full_weights": "raylm.checkpoint.writer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raylm.checkpoint' has no attribute {name!r}")


__all__ = ["list_checkpoints", "list_committed", "pick_resume", "prune", "step_dir_name", "verify_checkpoint",
           "load_checkpoint_weights", "resolve_checkpoint", "capture_rng", "restore_rng", *_LAZY]
