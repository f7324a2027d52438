"""This rank's random-number generator states as a weights_only-loadable dict, for a checkpoint's per-rank state."""

from __future__ import annotations

import random
from typing import cast

import numpy as np
import torch


def capture_rng() -> dict:
    """torch (CPU and every CUDA device), Python and NumPy global RNG states."""
    # numpy's stubs type the no-argument call (legacy=True) as returning a dict; it returns the legacy tuple.
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = legacy
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng returned (on the same rank of the same layout)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
