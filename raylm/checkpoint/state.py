"""Save and load an Engine's full training state layer by layer, so a checkpoint from one (pp, tp, dp) loads into any.

Saving: for each layer its stage owns, every rank helps assemble full fp32 tensors (ZeRO partitions over DP,
then TP shards), and the stage's (dp 0, tp 0) rank writes model/NNN-<layer>.pt and optim/NNN-<layer>.pt; rank 0
writes the small files and commits. Loading: every file is checked against the manifest first; then each rank
reads only its stage's layer files and keeps its TP shard and ZeRO partition. Same layout in, same bits out.

    path = save_checkpoint(engine, run_dir / "checkpoints", step, {"step": step, "tokens": tokens}, capture_rng())
    resumed = load_checkpoint(engine, path)   # -> Resumed(step, trainer_state, rank_state or None)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from raylm.checkpoint import optim_state
from raylm.checkpoint.commit import commit, new_tmp_dir
from raylm.checkpoint.manifest import read_manifest, verify_checkpoint
from raylm.checkpoint.names import (ENGINE_STATE_FILE, TRAINER_STATE_FILE, layer_index, model_file, optim_file,
                                    rank_file)
from raylm.checkpoint.writer import Records, manifest_extra, model_config_of, save_json, save_run_files, save_torch
from raylm.errors import CheckpointError
from raylm.log import get_logger
from raylm.model.gpt import param_shapes
from raylm.parallel.pipeline import gather_tp, local_params, shard_of
from raylm.parallel.tensor import TPGroup


SAVE_PHASES = ("before-files", "mid-files", "before-commit", "after-commit")


@dataclass
class Resumed:
    """What load_checkpoint hands back to the training loop."""

    path: Path
    step: int
    trainer_state: dict  # the dict save_checkpoint was given (rank 0's)
    rank_state: dict | None  # this rank's per-rank dict; None when the checkpoint's layout differs (or it had none)


def _layout(engine) -> dict:
    return {"pp": engine.topo.pp, "tp": engine.topo.tp, "dp": engine.topo.dp}


def _stage_layers(engine, owned_only: bool) -> dict[str, dict[str, nn.Parameter]]:
    """{model file: {full name: local param}} for this stage's layers, in layer order.

    owned_only drops the last stage's copy of a tied embedding, which stage 0 saves.
    """
    pipe, n_layer = engine.ds.module, engine.cfg.model.n_layer
    layers: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in local_params(pipe).items():
        if owned_only and pipe.stage_owner(layer_index(name, n_layer)) != pipe.stage_id:
            continue
        layers.setdefault(model_file(name, n_layer), {})[name] = param
    return dict(sorted(layers.items()))


def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU fp32 copy with its own storage (torch.save of a view would write the whole flat buffer behind it)."""
    return t.detach().to("cpu", torch.float32, copy=True)


def _gather_layer(engine, params: dict[str, nn.Parameter]) -> tuple[dict, dict]:
    """Full weights and moments of one layer on the replica-0 ranks (empty dicts elsewhere); DP then TP collectives."""
    weights, moments = {}, {}
    for name, param in params.items():
        value, adam = optim_state.master_value(param), optim_state.adam_moments(engine, param)  # DP collectives
        if engine.coords.dp_rank != 0:
            continue  # each DP replica's TP group could gather; replica 0's suffices
        weights[name] = _owned_cpu(gather_tp(value, param, engine.tp))
        moments[name] = {key: _owned_cpu(gather_tp(v, param, engine.tp)) for key, v in adam.items()}
    return weights, moments


def _write_layers(engine, folder: Path) -> tuple[Records, str | None]:
    """Gather each owned layer; this stage's (dp 0, tp 0) rank writes its model and optimizer files.

    A failed write does not stop the gathering: every rank must take part in every layer's collectives.
    """
    writer = engine.coords.dp_rank == 0 and engine.coords.tp_rank == 0
    files: Records = {}
    error = None
    for rel_model, params in _stage_layers(engine, owned_only=True).items():
        weights, moments = _gather_layer(engine, params)
        if writer and error is None:
            try:
                files.update(save_torch(folder, rel_model, weights))
                files.update(save_torch(folder, optim_file(next(iter(params)), engine.cfg.model.n_layer), moments))
            except OSError as exc:
                error = f"writing {folder / rel_model} failed on rank {engine.rank}: {exc}"
    return files, error


def _engine_state(engine) -> dict:
    """AdamW's step and learning rate plus DeepSpeed's counters: layout-free scalars."""
    ds = engine.ds
    return {"adam_step": optim_state.adam_step(engine), "lr": engine.optimizer.param_groups[0]["lr"],
            "global_steps": ds.global_steps, "global_samples": ds.global_samples, "skipped_steps": ds.skipped_steps}


def _on_rank0(fn: Callable[[], object]) -> object:
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


def _all_or_none(error: str | None) -> None:
    """Raise the first rank's error on every rank (so none goes on to a collective the others skip)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def save_checkpoint(engine, checkpoints_dir: str | Path, step: int, trainer_state: dict,
                    rank_state: dict | None = None, on_phase: Callable[[str], None] | None = None) -> Path:
    """Write and commit <checkpoints_dir>/step-XXXXXXXX/ (all ranks call together); returns its path.

    trainer_state: JSON-able, the same on every rank (rank 0's is written). rank_state: this rank's tensors and
    plain values (e.g. capture_rng()), restored only into the same layout. on_phase: called with each phase
    name in SAVE_PHASES as the save reaches it (fault drills kill a rank there).
    """
    phase = on_phase or (lambda name: None)
    optim_state.ensure_adam_state(engine)
    tmp = Path(_on_rank0(lambda: str(new_tmp_dir(checkpoints_dir, step))))
    phase("before-files")
    files, error = _write_layers(engine, tmp)
    phase("mid-files")
    if error is None:
        try:  # no collectives below: a failing rank can stop here and report
            if rank_state is not None:
                files.update(save_torch(tmp, rank_file(engine.rank), rank_state))
            if engine.rank == 0:
                files.update(save_run_files(tmp, engine.cfg, trainer_state))
                files.update(save_json(tmp, ENGINE_STATE_FILE, _engine_state(engine)))
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a trainer_state that is not JSON-able
            error = f"writing checkpoint step {step} under {tmp} failed on rank {engine.rank}: {exc}"
    _all_or_none(error)
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, files)  # every file is on storage once this returns
    merged = {path: record for rank_files in every_rank for path, record in rank_files.items()}
    extra = manifest_extra(engine.cfg, _layout(engine), optimizer=True)
    phase("before-commit")
    committed = Path(_on_rank0(lambda: str(commit(tmp, step, merged, extra))))
    phase("after-commit")
    return committed


def _check_model(manifest: dict, engine, folder: Path) -> None:
    """CheckpointError when the checkpoint's model has other parameters (names or shapes) than this engine's."""
    saved, mine = manifest["model"], asdict(engine.cfg.model)
    saved_model = model_config_of(manifest)
    differ = [k for k in mine if k in saved and saved[k] != mine[k]]
    if param_shapes(saved_model, manifest["padded_vocab"]) != param_shapes(engine.cfg.model, engine.vocab_size):
        diffs = [f"model.{k}={saved[k]!r} (this run: {mine[k]!r})" for k in differ]
        if manifest["padded_vocab"] != engine.vocab_size:
            diffs.append(f"data.vocab_size={manifest['vocab_size']} (this run: {engine.cfg.data.vocab_size})")
        raise CheckpointError(f"checkpoint {folder} holds another model: {', '.join(diffs)}; resume with the "
                              f"checkpoint's model settings, or start fresh (checkpoint.resume=never or another "
                              f"run.name)")
    if differ:
        get_logger().warning("checkpoint %s was written with other model settings (%s); loading it anyway",
                             folder.name, ", ".join(f"model.{k}={saved[k]!r}" for k in differ))


def _files_to_verify(engine, manifest: dict) -> list[str]:
    """The files this rank vouches for: its stage's layer files on the stage's (dp 0, tp 0) rank, its own rank
    file, and the small JSON files on rank 0. Between them the ranks check every file they will read."""
    files = []
    if engine.coords.dp_rank == 0 and engine.coords.tp_rank == 0:
        for rel_model, params in _stage_layers(engine, owned_only=False).items():
            files.append(rel_model)
            if manifest["optimizer"]:
                files.append(optim_file(next(iter(params)), engine.cfg.model.n_layer))
    if manifest.get("layout") == _layout(engine) and rank_file(engine.rank) in manifest["files"]:
        files.append(rank_file(engine.rank))
    if engine.rank == 0:
        files += [f for f in (TRAINER_STATE_FILE, ENGINE_STATE_FILE) if f in manifest["files"]]
    return files


def _verify(engine, folder: Path) -> dict:
    """The manifest, once every rank has checked its share of the files (before anything is unpickled)."""
    error, manifest = None, None
    try:
        manifest = read_manifest(folder)
        _check_model(manifest, engine, folder)
        verify_checkpoint(folder, only=_files_to_verify(engine, manifest))
    except CheckpointError as exc:
        error = str(exc)
    _all_or_none(error)
    return manifest


def _full_shape(param: nn.Parameter, tp: TPGroup) -> tuple[int, ...]:
    """The unsharded shape of a (possibly TP-split) parameter."""
    shape = list(param.shape)
    dim = getattr(param, "tp_split_dim", None)
    if dim is not None:
        shape[dim] *= tp.size
    return tuple(shape)


def _load_tensors(folder: Path, rel_path: str):
    return torch.load(folder / rel_path, map_location="cpu", weights_only=True)


def _load_layers(engine, folder: Path, with_optimizer: bool) -> None:
    """Each of this stage's layers: read the full tensors, keep this rank's TP shard (and ZeRO partition)."""
    n_layer = engine.cfg.model.n_layer
    for rel_model, params in _stage_layers(engine, owned_only=False).items():
        weights = _load_tensors(folder, rel_model)
        moments = _load_tensors(folder, optim_file(next(iter(params)), n_layer)) if with_optimizer else None
        for name, param in params.items():
            full = weights.get(name)
            if full is None or tuple(full.shape) != _full_shape(param, engine.tp):
                found = "nothing" if full is None else f"shape {tuple(full.shape)}"
                raise CheckpointError(f"{folder / rel_model} holds {found} for {name}, this model needs "
                                      f"{_full_shape(param, engine.tp)}; load it into the model it was saved from")
            optim_state.set_master_value(param, shard_of(full, param, engine.tp))
            if moments is not None:
                shards = {key: shard_of(t, param, engine.tp) for key, t in moments[name].items()}
                optim_state.set_adam_moments(engine, param, shards)


def _restore_engine_state(engine, state: dict) -> None:
    optim_state.set_adam_step(engine, state["adam_step"])
    engine.set_lr(state["lr"])
    engine.ds.global_steps = state["global_steps"]
    engine.ds.global_samples = state["global_samples"]
    engine.ds.skipped_steps = state["skipped_steps"]


def load_checkpoint(engine, path: str | Path) -> Resumed:
    """Load a committed checkpoint, written under any layout, into this engine (all ranks call together).

    Weights, fp32 masters and AdamW moments and step come back exactly; a weights-only checkpoint starts AdamW
    fresh. Raises CheckpointError, naming the file, if anything fails its manifest check.
    """
    folder = Path(path)
    manifest = _verify(engine, folder)
    optim_state.ensure_adam_state(engine)
    with_optimizer = bool(manifest["optimizer"])
    _load_layers(engine, folder, with_optimizer)
    if with_optimizer:
        _restore_engine_state(engine, json.loads((folder / ENGINE_STATE_FILE).read_text()))
    else:
        optim_state.reset_adam_moments(engine)
    rank_state = None
    if manifest.get("layout") == _layout(engine) and rank_file(engine.rank) in manifest["files"]:
        rank_state = _load_tensors(folder, rank_file(engine.rank))
    trainer_state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    return Resumed(path=folder, step=int(manifest["step"]), trainer_state=trainer_state, rank_state=rank_state)
