"""Save and load an Engine's full training state layer by layer, so a checkpoint from one (pp, tp, dp) loads into any.

Saving: the engine gathers each layer its stage owns into full fp32 tensors (Engine.save_state: ZeRO partitions
over DP, then TP shards; under ZeRO-3 one layer at a time, never the whole model) and the stage's (dp 0, tp 0)
rank writes model/NNN-<layer>.pt and optim/NNN-<layer>.pt here; rank 0 writes the small files and commits.
Loading: every rank checks the sha256 of each file it will read, then reads only its stage's layer files and the
engine keeps its TP shard and ZeRO partition (Engine.load_state). Same layout in, same bits out.

    path = save_checkpoint(engine, cfg, run_dir / "checkpoints", step, {"step": step, ...}, capture_rng())
    resumed = load_checkpoint(engine, cfg, path)   # -> Resumed(step, trainer_state, rank_state or None)

Nothing here imports DeepSpeed: the engine's state goes through its save_state / load_state.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from raylm.checkpoint.commit import commit, list_committed, new_tmp_dir, upload_own_files
from raylm.checkpoint.finite import first_non_finite
from raylm.checkpoint.host_copies import HostCopies
from raylm.checkpoint.manifest import read_checkpoint_manifest, verify_checkpoint
from raylm.checkpoint.names import ENGINE_STATE_FILE, TRAINER_STATE_FILE, model_file, optim_file, rank_file
from raylm.checkpoint.writer import (
    Records,
    manifest_extra,
    model_config_of,
    save_json,
    save_run_files,
    save_torch,
)
from raylm.config import Config
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError, RaylmError
from raylm.log import get_logger
from raylm.model.facts import model_layers
from raylm.model.gpt import param_shapes
from raylm.storage.location import Location, as_location, is_remote, local_view

if TYPE_CHECKING:
    from raylm.parallel.engine import Engine

SAVE_PHASES = ("before-files", "mid-files", "before-commit", "after-commit")
T = TypeVar("T")


@dataclass
class Resumed:
    """What load_checkpoint hands back to the training loop."""

    path: Location
    step: int
    trainer_state: dict  # the dict save_checkpoint was given (rank 0's)
    rank_state: (
        dict | None
    )  # this rank's per-rank dict; None when the checkpoint's layout differs (or it had none)


def _layer_files(cfg: Config) -> dict[int, tuple[str, str]]:
    """{layer index: (model file, optimizer file)} of the whole model."""
    layers = model_layers(cfg.model, padded_vocab(cfg.data.vocab_size))
    n_layer = cfg.model.n_layer
    return {
        index: (model_file(next(iter(names)), n_layer), optim_file(next(iter(names)), n_layer))
        for index, names in layers.items()
    }


NON_FINITE = "refusing to commit a checkpoint with a non-finite weight"


class _LayerWriter:
    """write_layer for Engine.save_state: saves each layer's two files, and keeps the first error instead of
    raising, so this rank still takes part in every later layer's collectives."""

    def __init__(self, folder: Path, cfg: Config, rank: int, checkpoints_dir: Location | str):
        self.folder, self.files_of, self.rank = folder, _layer_files(cfg), rank
        # a folder's files stay out of the page cache; a prefix's staged copies are read once more, to upload
        self.keep_cached = is_remote(as_location(checkpoints_dir))
        self.files: Records = {}
        self.error: str | None = None

    def __call__(self, index: int, weights: dict, moments: dict) -> None:
        if self.error is not None:
            return
        rel_model, rel_optim = self.files_of[index]
        bad = first_non_finite(weights)
        if bad is not None:
            self.error = f"{NON_FINITE}: {bad} on rank {self.rank}"
            return
        try:
            self.files.update(save_torch(self.folder, rel_model, weights, self.keep_cached))
            self.files.update(save_torch(self.folder, rel_optim, moments, self.keep_cached))
        except OSError as exc:
            self.error = f"writing {self.folder / rel_model} failed on rank {self.rank}: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    """An OSError's text without its errno prefix, e.g. 'No space left on device'."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _space_hint(checkpoints_dir: Location | str) -> str:
    """What a failed save needs: about the newest committed checkpoint's bytes, against what the disk has free."""
    root = as_location(checkpoints_dir)
    if is_remote(root):
        return "older checkpoints are untouched; fix the storage problem named above, then rerun to resume"
    committed = list_committed(checkpoints_dir)
    free = shutil.disk_usage(root).free
    if not committed:
        return f"{free} bytes are free there; free space or point run.dir at a larger disk"
    need = sum(record["bytes"] for record in read_checkpoint_manifest(committed[0])["files"].values())
    return (
        f"a checkpoint needs about {need} bytes (the size of {committed[0].name}, which is untouched) and "
        f"{free} are free there; free space or point run.dir at a larger disk, then rerun to resume"
    )


def on_rank0(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 and hand its result to every rank; its failure becomes a CheckpointError everywhere."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others hang
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise CheckpointError(f"checkpoint save failed on rank 0: {value}")
    return value


def _all_or_none(error: str | None, kind: type[CheckpointError] = CheckpointError) -> None:
    """Raise the first rank's error on every rank (so none goes on to a collective the others skip)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise kind(first)


@dataclass
class Snapshot:
    """One rank's part of a save, taken at the save step: where its files go and what they hold. A background
    save (raylm.checkpoint.background) keeps host copies of the layers this rank writes in `layers` (in its
    HostCopies' buffers); a save in the loop streams them to disk as they are gathered and leaves it empty."""

    tmp: Path
    step: int
    rank: int
    layout: dict
    trainer_state: dict
    rank_state: dict | None
    scalars: dict = field(default_factory=dict)  # the engine's optimizer scalars (engine.json)
    layers: list[tuple[int, dict, dict]] = field(default_factory=list)  # (index, weights, moments)


def open_save(
    engine: Engine,
    cfg: Config,
    checkpoints_dir: Location | str,
    step: int,
    trainer_state: dict,
    rank_state: dict | None,
) -> Snapshot:
    """Rank 0 creates the save's tmp-* folder and every rank learns its name (a collective)."""
    tmp = Path(on_rank0(lambda: str(new_tmp_dir(checkpoints_dir, step, cfg.data.cache_dir))))
    # the trainer state's lists go on changing in the loop while a background save writes it
    return Snapshot(tmp, step, engine.rank, engine.layout, copy.deepcopy(trainer_state), rank_state)


def take_snapshot(engine: Engine, snapshot: Snapshot, host: HostCopies) -> Snapshot:
    """Copy every layer this rank writes into `host`'s buffers (the engine's gathering collectives, every rank),
    with the optimizer's scalars: after this the next optimizer step may change the engine's tensors."""
    snapshot.scalars = engine.save_state(
        lambda index, weights, moments: snapshot.layers.append((index, weights, moments)), host.copy
    )
    return snapshot


def write_snapshot(
    snapshot: Snapshot, cfg: Config, checkpoints_dir: Location | str, phase: Callable[[str], None]
) -> tuple[Records, str | None]:
    """Write (and on object storage upload) this rank's files of a snapshot; no collective, so it runs in a
    background thread. Returns the files and the first error."""
    writer = _LayerWriter(snapshot.tmp, cfg, snapshot.rank, checkpoints_dir)
    while snapshot.layers:
        writer(*snapshot.layers.pop(0))
    phase("mid-files")
    return write_rest(snapshot, cfg, checkpoints_dir, writer.files, writer.error)


def write_rest(
    snapshot: Snapshot, cfg: Config, checkpoints_dir: Location | str, files: Records, error: str | None
) -> tuple[Records, str | None]:
    """After the layer files: this rank's own file, rank 0's small files, then this rank's uploads."""
    tmp, rank, step = snapshot.tmp, snapshot.rank, snapshot.step
    if error is None:
        try:  # no collectives below: a failing rank can stop here and report
            if snapshot.rank_state is not None:
                files.update(save_torch(tmp, rank_file(rank), snapshot.rank_state))
            if rank == 0:
                files.update(save_run_files(tmp, cfg, snapshot.trainer_state))
                files.update(save_json(tmp, ENGINE_STATE_FILE, snapshot.scalars))
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a trainer_state that is not JSON-able
            error = f"writing checkpoint step {step} under {tmp} failed on rank {rank}: {_reason(exc)}"
    if error is None:
        try:
            upload_own_files(tmp, checkpoints_dir, step, files)
        except (OSError, RaylmError) as exc:
            error = f"uploading checkpoint step {step} failed on rank {rank}: {_reason(exc)}"
    return files, error


def gather_written(
    snapshot: Snapshot, checkpoints_dir: Location | str, files: Records, error: str | None
) -> Records:
    """Every rank's written files, once every rank's are on storage (a collective); a failure on any rank is a
    CheckpointError on all, and rank 0 removes what the failed save left."""
    try:
        _all_or_none(error)
    except CheckpointError as exc:  # nothing of a failed save stays to fill the disk; older checkpoints stay
        if snapshot.rank == 0:
            shutil.rmtree(snapshot.tmp, ignore_errors=True)
        if str(exc).startswith(NON_FINITE):
            raise CheckpointError(f"checkpoint step {snapshot.step}: {exc}") from None
        raise CheckpointError(f"{exc}; {_space_hint(checkpoints_dir)}") from None  # a write failed
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, files)  # every file is on storage once this returns
    return {path: record for rank_files in every_rank for path, record in rank_files.items()}


def commit_snapshot(
    snapshot: Snapshot, cfg: Config, checkpoints_dir: Location | str, files: Records
) -> Location:
    """Rank 0: the manifest of every rank's files, written last, makes the save a checkpoint (no collective)."""
    extra = manifest_extra(cfg, snapshot.layout, optimizer=True)
    return commit(snapshot.tmp, snapshot.step, files, extra, checkpoints_dir)


def save_checkpoint(
    engine: Engine,
    cfg: Config,
    checkpoints_dir: Location | str,
    step: int,
    trainer_state: dict,
    rank_state: dict | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Location:
    """Write and commit <checkpoints_dir>/step-XXXXXXXX/ (all ranks call together); returns its path.

    checkpoints_dir may be an object-storage prefix: each rank then writes its files into this node's mirror
    and uploads them itself, and rank 0 uploads the manifest last (raylm.checkpoint.commit).
    trainer_state: JSON-able, the same on every rank (rank 0's is written). rank_state: this rank's tensors and
    plain values (e.g. capture_rng()), restored only into the same layout. on_phase: called with each phase
    name in SAVE_PHASES as the save reaches it (fault drills kill a rank there).
    """
    phase = on_phase or (lambda name: None)
    snapshot = open_save(engine, cfg, checkpoints_dir, step, trainer_state, rank_state)
    try:
        phase("before-files")
        writer = _LayerWriter(snapshot.tmp, cfg, engine.rank, checkpoints_dir)
        snapshot.scalars = engine.save_state(writer)  # each layer is written as soon as it is gathered
        phase("mid-files")
        files, error = write_rest(snapshot, cfg, checkpoints_dir, writer.files, writer.error)
        merged = gather_written(snapshot, checkpoints_dir, files, error)
        phase("before-commit")
        committed = on_rank0(lambda: str(commit_snapshot(snapshot, cfg, checkpoints_dir, merged)))
        phase("after-commit")
        return as_location(committed)
    finally:
        drop_staging(snapshot, checkpoints_dir)


def drop_staging(snapshot: Snapshot, checkpoints_dir: Location | str) -> None:
    """On object storage, this node's staging copy: every file is uploaded (or the save failed) by now."""
    if is_remote(as_location(checkpoints_dir)):
        shutil.rmtree(snapshot.tmp, ignore_errors=True)


def _check_model(manifest: dict, cfg: Config, folder: Location) -> None:
    """CheckpointError when the checkpoint's model has other parameters (names or shapes) than this run's."""
    saved, mine = manifest["model"], asdict(cfg.model)
    saved_model = model_config_of(manifest)
    differ = [k for k in mine if k in saved and saved[k] != mine[k]]
    vocab = padded_vocab(cfg.data.vocab_size)
    if param_shapes(saved_model, manifest["padded_vocab"]) != param_shapes(cfg.model, vocab):
        diffs = [f"model.{k}={saved[k]!r} (this run: {mine[k]!r})" for k in differ]
        if manifest["padded_vocab"] != vocab:
            diffs.append(f"data.vocab_size={manifest['vocab_size']} (this run: {cfg.data.vocab_size})")
        raise CheckpointError(
            f"checkpoint {folder} holds another model: {', '.join(diffs)}; resume with the "
            f"checkpoint's model settings, or start fresh (checkpoint.resume=never or another "
            f"run.name)"
        )
    if differ:
        get_logger().warning(
            "checkpoint %s was written with other model settings (%s); loading it anyway",
            folder.name,
            ", ".join(f"model.{k}={saved[k]!r}" for k in differ),
        )


def _files_read(engine: Engine, cfg: Config, manifest: dict) -> list[str]:
    """Every file this rank will read: its stage's layer files, its own rank file (same layout only), and the
    two small state files."""
    files_of = _layer_files(cfg)
    files = []
    for index in engine.layer_indices(owned_only=False):
        rel_model, rel_optim = files_of[index]
        files += [rel_model, rel_optim] if manifest["optimizer"] else [rel_model]
    if manifest.get("layout") == engine.layout and rank_file(engine.rank) in manifest["files"]:
        files.append(rank_file(engine.rank))
    return files + [f for f in (TRAINER_STATE_FILE, ENGINE_STATE_FILE) if f in manifest["files"]]


class UnverifiedFile(CheckpointError):
    """A checkpoint file failed its manifest check (missing, resized or altered): resume=auto tries an older one."""


def verify_for_load(engine: Engine, cfg: Config, path: Location | str) -> dict:
    """The manifest, once every rank has checked the sha256 of each file it will read (before anything is
    unpickled; from object storage, while fetching it into this node's data.cache_dir). All ranks call
    together and raise alike: CheckpointError for another model (never skipped, the run's settings are wrong),
    UnverifiedFile, naming it, for a bad file."""
    folder = as_location(path)
    error, manifest = None, None
    try:
        manifest = read_checkpoint_manifest(folder)
        _check_model(manifest, cfg, folder)
    except CheckpointError as exc:
        error = str(exc)
    _all_or_none(error)
    assert manifest is not None  # _all_or_none raised if reading it failed
    try:
        verify_checkpoint(folder, only=_files_read(engine, cfg, manifest), cache_dir=cfg.data.cache_dir)
    except CheckpointError as exc:
        error = str(exc)
    _all_or_none(error, UnverifiedFile)
    return manifest


def _load_tensors(folder: Path, rel_path: str):
    return torch.load(folder / rel_path, map_location="cpu", weights_only=True)


def _layer_reader(
    cfg: Config, folder: Location, with_optimizer: bool
) -> Callable[[int], tuple[dict, dict | None]]:
    """read_layer for Engine.load_state: one layer's full weights (shapes checked) and moments from its files
    (verified copies in this node's mirror when the checkpoint is on object storage)."""
    files_of, shapes = _layer_files(cfg), model_layers(cfg.model, padded_vocab(cfg.data.vocab_size))
    local = local_view(folder, cfg.data.cache_dir)

    def read_layer(index: int) -> tuple[dict, dict | None]:
        rel_model, rel_optim = files_of[index]
        weights = _load_tensors(local, rel_model)
        for name, shape in shapes[index].items():
            full = weights.get(name)
            if full is None or full.shape != shape:
                found = "nothing" if full is None else f"shape {tuple(full.shape)}"
                raise CheckpointError(
                    f"{folder / rel_model} holds {found} for {name}, this model needs "
                    f"{tuple(shape)}; load it into the model it was saved from"
                )
        return weights, _load_tensors(local, rel_optim) if with_optimizer else None

    return read_layer


def load_checkpoint(
    engine: Engine, cfg: Config, path: Location | str, manifest: dict | None = None
) -> Resumed:
    """Load a committed checkpoint, written under any layout, into this engine (all ranks call together).

    Weights, fp32 masters and AdamW moments and step come back exactly; a weights-only checkpoint starts AdamW
    fresh. Each rank first checks the files it reads (or pass the manifest verify_for_load returned); raises
    CheckpointError, naming the file, if one fails.
    """
    folder = as_location(path)
    manifest = manifest or verify_for_load(engine, cfg, folder)
    local = local_view(folder, cfg.data.cache_dir)
    with_optimizer = bool(manifest["optimizer"])
    scalars = json.loads((local / ENGINE_STATE_FILE).read_text()) if with_optimizer else None
    engine.load_state(_layer_reader(cfg, folder, with_optimizer), scalars)
    rank_state = None
    if manifest.get("layout") == engine.layout and rank_file(engine.rank) in manifest["files"]:
        rank_state = _load_tensors(local, rank_file(engine.rank))
    trainer_state = json.loads((local / TRAINER_STATE_FILE).read_text())
    return Resumed(
        path=folder, step=int(manifest["step"]), trainer_state=trainer_state, rank_state=rank_state
    )
