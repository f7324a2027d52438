"""Writing checkpoint files (each fsynced and recorded for the manifest); a weights-only checkpoint on one process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
import torch.utils.serialization.config as serialization_config
import yaml

from raylm.checkpoint.commit import commit, new_tmp_dir, upload_own_files
from raylm.checkpoint.manifest import file_record
from raylm.checkpoint.names import TRAINER_STATE_FILE, layer_file, model_file
from raylm.config import Config, to_dict
from raylm.config.derived import padded_vocab
from raylm.config.schema import ModelConfig
from raylm.data.cache import local_tokenizer
from raylm.fsync import fsync_path
from raylm.storage.file_names import CONFIG_FILE, TOKENIZER_FILE
from raylm.storage.location import Location

Records = dict[str, dict]  # {path relative to the checkpoint folder: {"bytes", "sha256"}}


class _HashingFile:
    """A file open for writing that hashes the bytes written through it: torch.save writes its zip front to back
    (it refuses any other position), so the digest is the file's, with no second read of it. hashlib and the
    file's write both let go of the GIL on a large buffer: a background writer holds it only between the calls."""

    def __init__(self, file: BinaryIO):
        self.file, self.digest, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.bytes += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()


# torch's CRC setting is one for the whole process: one save_torch at a time turns it off and back on
_NO_CRC = threading.Lock()
_SERIALIZATION: Any = serialization_config  # a config module made at import: mypy does not see its patch()


def save_torch(folder: Path, rel_path: str, obj, keep_cached: bool = True) -> Records:
    """torch.save `obj` (tensors, numbers, strings, lists, dicts: what weights_only loading accepts), fsynced,
    with its record hashed as it is written. The zip's CRC-32s are left out (torch.load does not need them):
    the manifest's sha256 already covers every byte, and computing them cost as much CPU as the sha256.
    `keep_cached` False drops the file from the page cache once it is on disk: a checkpoint's gigabytes are
    read again only by a resume, and would otherwise push out pages the training needs."""
    path = folder / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            hashed = _HashingFile(f)
            with _NO_CRC, _SERIALIZATION.patch({"save.compute_crc32": False}):
                torch.save(obj, cast(BinaryIO, hashed))  # torch.save needs only write() and flush()
            f.flush()
            os.fsync(f.fileno())
            if not keep_cached and hasattr(os, "posix_fadvise"):  # Linux
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except RuntimeError:  # torch's zip writer reports a refused write only as an internal position mismatch
        raise OSError(
            "the file system refused the write (a full disk, a quota or a file-size limit)"
        ) from None
    assert path.stat().st_size == hashed.bytes, f"{path}: torch.save wrote past the hashing file"
    return {rel_path: {"bytes": hashed.bytes, "sha256": hashed.digest.hexdigest()}}


def save_text(folder: Path, rel_path: str, text: str) -> Records:
    path = folder / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    fsync_path(path)
    return {rel_path: file_record(path)}


def save_json(folder: Path, rel_path: str, obj: dict) -> Records:
    return save_text(folder, rel_path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def tokenizer_source(cfg: Config) -> Path | None:
    """The run's tokenizer.json (in data.out_dir, or this node's cached copy of an object-storage prefix; else
    data.tokenizer), if there is one to copy."""
    candidates = [local_tokenizer(cfg.data.out_dir, cfg.data.cache_dir)]
    if cfg.data.tokenizer:
        candidates.append(Path(cfg.data.tokenizer).expanduser())
    return next((p for p in candidates if p.is_file()), None)


def save_run_files(folder: Path, cfg: Config, trainer_state: dict) -> Records:
    """config.yaml, trainer_state.json and (when the run has one) tokenizer.json: the small files, by rank 0."""
    files = save_text(folder, CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    files.update(save_json(folder, TRAINER_STATE_FILE, trainer_state))
    tokenizer = tokenizer_source(cfg)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
        fsync_path(folder / TOKENIZER_FILE)
        files[TOKENIZER_FILE] = file_record(folder / TOKENIZER_FILE)
    return files


def manifest_extra(cfg: Config, layout: dict | None, optimizer: bool) -> dict:
    """What a reader needs before opening any tensor file: the layout, the model's shape and whether AdamW is in."""
    return {
        "layout": layout,
        "precision": cfg.train.precision,
        "optimizer": optimizer,
        "model": dataclasses.asdict(cfg.model),
        "vocab_size": cfg.data.vocab_size,
        "padded_vocab": padded_vocab(cfg.data.vocab_size),
    }


def model_config_of(manifest: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was written for (settings added to raylm since then take their defaults)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in manifest["model"].items() if k in known})


def save_full_weights(
    cfg: Config,
    full_state: dict[str, torch.Tensor],
    checkpoints_dir: Location | str,
    step: int,
    trainer_state: dict | None = None,
) -> Location:
    """A committed weights-only checkpoint from full tensors on one process (no optimizer state, no layout), in
    a folder or an object-storage prefix.

    Loading it into an engine sets the weights and starts AdamW fresh; export reads it like any checkpoint.
    """
    tmp = new_tmp_dir(checkpoints_dir, step, cfg.data.cache_dir)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in full_state.items():
        by_file.setdefault(layer_file(name, cfg.model.n_layer), {})[name] = tensor.detach().to(
            "cpu", torch.float32, copy=True
        )
    files: Records = {}
    for name_in_layer in by_file.values():
        files.update(save_torch(tmp, model_file(next(iter(name_in_layer)), cfg.model.n_layer), name_in_layer))
    files.update(save_run_files(tmp, cfg, {"step": step, **(trainer_state or {})}))
    upload_own_files(tmp, checkpoints_dir, step, files)
    return commit(tmp, step, files, manifest_extra(cfg, layout=None, optimizer=False), checkpoints_dir)
