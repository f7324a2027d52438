"""Config drift on resume: settings that decide which samples come next, or what the model is, must not change.

A resumed run continues the data stream at its sample offset, so the seed, the sources, the sequence length and
the tokenizer must be the ones the checkpoint was trained with, and the model must have its shape. Layout keys
(parallel.pp/tp/dp/cp, micro_batch) and schedules may change freely: checkpoints reshard, and the data order does
not depend on them.
"""

from __future__ import annotations

from typing import Any

import yaml

from raylm.checkpoint.manifest import read_checkpoint_manifest
from raylm.config import Config, to_dict
from raylm.data.shards import read_data_manifest
from raylm.errors import ConfigError, DataError
from raylm.storage.file_names import CONFIG_FILE, TOKENIZER_FILE
from raylm.storage.location import Location, local_view

DRIFT_KEYS = (
    "run.seed",
    "data.seq_len",
    "data.vocab_size",
    "model.n_layer",
    "model.n_head",
    "model.n_kv_head",
    "model.d_model",
    "model.ffn_hidden",
    "model.tie_embeddings",
)


def check_resume_drift(cfg: Config, checkpoint: Location) -> None:
    """ConfigError naming the first key whose value differs from the checkpoint's, or a tokenizer that does.
    The checkpoint's config.yaml must have been verified against its manifest (which fetches a checkpoint on
    object storage into this node's data.cache_dir, where it is read here)."""
    saved = yaml.safe_load((local_view(checkpoint, cfg.data.cache_dir) / CONFIG_FILE).read_text())
    now = to_dict(cfg)
    for dotted in DRIFT_KEYS:
        before, after = _get(saved, dotted), _get(now, dotted)
        if before is not None and before != after:
            _refuse(dotted, after, before, checkpoint)
    before, after = data_sources(saved), data_sources(now)
    if before != after:
        _refuse("data.sources", after, before, checkpoint, hint="data.sources/data.out_dir")
    _check_tokenizer(cfg, checkpoint)


def data_sources(tree: dict) -> list[tuple[str, float]]:
    """The (folder, weight) pairs a run streams from: data.sources, or data.out_dir alone."""
    data = tree.get("data", {})
    sources = data.get("sources") or [{"path": data.get("out_dir"), "weight": 1.0}]
    return [(str(s.get("path")), float(s.get("weight", 1.0))) for s in sources]


def _check_tokenizer(cfg: Config, checkpoint: Location) -> None:
    files = read_checkpoint_manifest(checkpoint)["files"]
    if TOKENIZER_FILE not in files:
        return  # written before tokenizers were saved with checkpoints: nothing to compare
    folder = data_sources(to_dict(cfg))[0][0]  # a folder or a prefix
    try:
        prepared = read_data_manifest(folder)["tokenizer_sha256"]
    except (DataError, KeyError):
        return  # no prepared data to compare with: the preflight check names that problem itself
    saved = files[TOKENIZER_FILE]["sha256"]
    if prepared != saved:
        raise ConfigError(
            f"the data in {folder} was prepared with another tokenizer (sha256 {prepared[:16]}...) "
            f"than checkpoint {checkpoint} was trained with ({saved[:16]}...): resuming would feed the "
            f"model other token ids; point data.out_dir at the original data, or pass "
            f"--allow-config-change to resume anyway, or start a new run.name"
        )


def _refuse(dotted: str, now: Any, before: Any, checkpoint: Location, hint: str | None = None) -> None:
    raise ConfigError(
        f"{dotted}={now!r} differs from {before!r} in checkpoint {checkpoint}: resuming would change "
        f"which samples come next or the model itself; set {hint or dotted} back, pass "
        f"--allow-config-change to resume anyway, or start a new run.name"
    )


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
