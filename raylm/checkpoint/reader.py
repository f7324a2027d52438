"""Reading model weights out of a checkpoint on one process, layer by layer (optimizer files are never opened).

A checkpoint on object storage is read the same way: each file is fetched into this node's mirror of its prefix
(under the system temp folder), checked against the manifest while it downloads, then loaded from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.commit import list_committed
from raylm.checkpoint.manifest import MANIFEST, read_checkpoint_manifest, verify_checkpoint
from raylm.checkpoint.names import MODEL_DIR
from raylm.errors import CheckpointError
from raylm.storage.file_names import CONFIG_FILE
from raylm.storage.location import Location, as_location, local_view, read_bytes

CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints


def resolve_checkpoint(source: Location | str) -> Location:
    """A checkpoint folder (or prefix) as it is; a run folder (or its checkpoints/ folder) -> its newest committed
    checkpoint."""
    path = as_location(source, "RUN_OR_CHECKPOINT")
    if read_bytes(path / MANIFEST) is not None:
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        committed = list_committed(root)
        if committed:
            return committed[0]
    raise CheckpointError(
        f"no committed checkpoint at {path}; pass a checkpoint folder "
        f"(<run>/{CHECKPOINTS_DIR}/step-XXXXXXXX) or a run folder that has saved one"
    )


def model_files(manifest: dict) -> list[str]:
    """The checkpoint's model/NNN-<layer>.pt files in layer order."""
    return sorted(f for f in manifest["files"] if f.startswith(f"{MODEL_DIR}/"))


def iter_model_layers(folder: Location) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(file, {full name: fp32 tensor}) per layer; all model files and the config are verified before the first load."""
    manifest = verify_checkpoint(folder, only=[*model_files(read_checkpoint_manifest(folder)), CONFIG_FILE])
    local = local_view(folder)
    for rel_path in model_files(manifest):
        yield rel_path, torch.load(local / rel_path, map_location="cpu", weights_only=True)


def load_checkpoint_weights(source: Location | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(raw run-config tree, full fp32 state dict) of a checkpoint or a run's newest one, for `raylm generate`."""
    folder = resolve_checkpoint(source)
    state: dict[str, torch.Tensor] = {}
    for _, tensors in iter_model_layers(folder):
        state.update(tensors)
    tree = yaml.safe_load((local_view(folder) / CONFIG_FILE).read_text())
    return tree, state


def local_checkpoint_files(folder: Location, names: list[str]) -> Path:
    """The folder where `names` (files the manifest lists) can be read on this node, each verified first."""
    verify_checkpoint(folder, only=names)
    return local_view(folder)
