"""Final weights of a run as full tensors in <run>/final (whatever layout trained them), and loading them back."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
import yaml

from raylm.config import Config, to_dict
from raylm.errors import RaylmError

WEIGHTS_FILE = "model.pt"


def save_final_weights(cfg: Config, engine, run_dir: Path, rank: int) -> Path | None:
    """Gather the full weights (collective on every rank); rank 0 writes <run>/final atomically (tmp + rename)."""
    state = engine.full_state_dict()
    if rank != 0:
        return None
    final = run_dir / "final"
    tmp = run_dir / f".final.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE)
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tokenizer = Path(cfg.data.out_dir).expanduser() / "tokenizer.json"
    if tokenizer.exists():
        shutil.copy2(tokenizer, tmp / "tokenizer.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_weights_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(raw config tree, full state dict) from a folder written by save_final_weights."""
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise RaylmError(f"{folder} holds no {WEIGHTS_FILE}; pass a run folder that finished training "
                         f"or its final/ folder")
    tree = yaml.safe_load((folder / "config.yaml").read_text())
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return tree, state
