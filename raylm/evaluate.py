"""`raylm eval`: loss and perplexity of a run, checkpoint or export on a prepared split, in one process (no Ray).

The samples are the ones the training's evaluation uses: global samples 0 .. train.eval_samples - 1 (by default
eval_batches * global_batch) of the split in the run's (run.seed, data.seq_len) order, read by raylm.data.stream;
DP ranks split exactly those samples between them, so `raylm eval RUN` repeats the run's last val_loss (fp32
here, so a bf16 run's differs by its rounding). The model's tokenizer must be the one that prepared the data:
the sha256 of the source's tokenizer.json is compared with the data manifest's before anything is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.export import export_folder, open_export
from raylm.checkpoint.manifest import read_checkpoint_manifest
from raylm.checkpoint.reader import load_checkpoint_weights, local_checkpoint_files, resolve_checkpoint
from raylm.config import resolve
from raylm.config.derived import eval_samples, padded_vocab
from raylm.config.schema import Config
from raylm.data.shards import read_data_manifest
from raylm.data.stream import RankStream, normalize_sources
from raylm.data.tokenizer import file_sha256
from raylm.errors import DataError
from raylm.log import get_logger
from raylm.model.gpt import GPT
from raylm.storage.file_names import CONFIG_FILE, TOKENIZER_FILE

DEFAULT_SEQ_LEN = 128  # windows for a folder whose manifest predates recording data.seq_len


@dataclass
class Source:
    """A model to evaluate, opened but not yet read: its run config, tokenizer file, step if known, weights."""

    tree: dict
    tokenizer: Path | None
    step: int | None
    read_state: Callable[[], dict[str, torch.Tensor]]


def open_source(source: str | Path) -> Source:
    """An export folder (config.json), a checkpoint folder, or a run folder (its newest committed checkpoint);
    the weights are read only by `read_state`, after the data has been checked."""
    path = export_folder(source)  # a prefix is fetched into this node's cache first
    if path is not None:
        tree, weights = open_export(path)
        tokenizer = path / TOKENIZER_FILE
        return Source(
            tree,
            tokenizer if tokenizer.is_file() else None,
            None,
            lambda: {name: weights.read(name) for name in weights.shapes},
        )
    folder = resolve_checkpoint(source)
    manifest = read_checkpoint_manifest(folder)
    has_tokenizer = TOKENIZER_FILE in manifest["files"]
    local = local_checkpoint_files(folder, [CONFIG_FILE, *([TOKENIZER_FILE] if has_tokenizer else [])])
    tree = yaml.safe_load((local / CONFIG_FILE).read_text())
    return Source(
        tree,
        local / TOKENIZER_FILE if has_tokenizer else None,
        manifest.get("step"),
        lambda: load_checkpoint_weights(folder)[1],
    )


def check_same_tokenizer(source: str, tokenizer: Path | None, sources: tuple[tuple[str, float], ...]) -> None:
    """DataError when a data folder was prepared with another tokenizer than the model's (both named)."""
    if tokenizer is None:
        get_logger().warning(
            "%s carries no tokenizer.json: cannot check that the data was prepared with the "
            "model's tokenizer",
            source,
        )
        return
    model_sha = file_sha256(tokenizer)
    for folder, _ in sources:
        data_sha = read_data_manifest(folder)["tokenizer_sha256"]
        if data_sha != model_sha:
            data_tokenizer = Path(folder) / TOKENIZER_FILE
            raise DataError(
                f"{folder} was prepared with tokenizer sha256 {data_sha[:16]}... ({data_tokenizer}) "
                f"but {source} uses {model_sha[:16]}... ({tokenizer}); prepare the data with "
                f"data.tokenizer={tokenizer}, or pass --data a folder prepared with it"
            )


def _overrides(tree: dict, data: str | Path | None) -> dict:
    """The corpus and an init_from folder need not exist where we evaluate; an export without raylm's run
    config (a bare Hugging Face folder) reads windows of the data's own seq_len, within the model's positions."""
    overrides: dict = {"data.paths": [], "data.sources": [], "model.init_from": ""}
    if data is not None and "seq_len" not in tree.get("data", {}):
        prepared_seq_len = read_data_manifest(normalize_sources(data)[0][0]).get("seq_len") or DEFAULT_SEQ_LEN
        overrides["data.seq_len"] = min(prepared_seq_len, tree["model"]["max_seq_len"])
    return overrides


@torch.no_grad()
def mean_loss(model, stream: RankStream, micro_batches: int) -> float:
    """The mean of the micro-batches' mean losses: what the engine's eval_batch returns."""
    total = 0.0
    for _ in range(micro_batches):
        inputs, targets = next(stream)
        total += model(inputs, targets).item()
    return total / micro_batches


@dataclass
class EvalPlan:
    """What an evaluation reads, checked: the opened source, its resolved config, the data and the sample count."""

    opened: Source
    cfg: Config
    spec: str | Path | list  # the data argument RankStream takes
    sources: tuple[tuple[str, float], ...]
    samples: int


def plan_eval(source: str | Path, data: str | Path | None = None, batches: int | None = None) -> EvalPlan:
    """Open `source` and check its data (default: the run's own) before any weight is read."""
    if batches is not None and batches < 1:
        raise DataError(
            f"--batches {batches} must be at least 1 (global batches of train.global_batch samples)"
        )
    opened = open_source(source)
    cfg = resolve(opened.tree, _overrides(opened.tree, data))
    spec = data if data is not None else (list(cfg.data.sources) or cfg.data.out_dir)
    sources = normalize_sources(spec)
    check_same_tokenizer(str(source), opened.tokenizer, sources)
    _check_vocab(sources, cfg.data.vocab_size, str(source))
    samples = batches * cfg.train.global_batch if batches is not None else eval_samples(cfg)
    return EvalPlan(opened, cfg, spec, sources, samples)


def eval_stream(plan: EvalPlan, split: str, micro_batch: int) -> RankStream:
    """The evaluation's samples of `split`, in the run's order, `micro_batch` at a time (close it after use)."""
    cfg = plan.cfg
    return RankStream(
        plan.spec,
        split,
        cfg.data.seq_len,
        cfg.run.seed,
        dp_rank=0,
        dp_size=1,
        micro_batch=micro_batch,
        prefetch=0,
    )


def evaluate(
    source: str | Path, data: str | Path | None = None, split: str = "val", batches: int | None = None
) -> dict:
    """Loss and perplexity of `source` on `split` of `data` (default: the run's own data); a JSON-able dict."""
    plan = plan_eval(source, data, batches)
    cfg = plan.cfg
    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(plan.opened.read_state())
    model.eval()
    micro_batch = cfg.parallel.micro_batch
    micro_batches = max(1, plan.samples // micro_batch)
    stream = eval_stream(plan, split, micro_batch)
    try:
        loss = mean_loss(model, stream, micro_batches)
    finally:
        stream.close()
    samples = micro_batches * micro_batch
    return {
        "source": str(source),
        "step": plan.opened.step,
        "data": [folder for folder, _ in plan.sources],
        "split": split,
        "samples": samples,
        "tokens": samples * cfg.data.seq_len,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
    }


def _check_vocab(sources: tuple[tuple[str, float], ...], vocab_size: int, source: str) -> None:
    for folder, _ in sources:
        data_vocab = read_data_manifest(folder)["vocab_size"]
        if data_vocab > vocab_size:
            raise DataError(
                f"{folder} was prepared with data.vocab_size={data_vocab} but {source} has only "
                f"{vocab_size} tokens; evaluate on data prepared with the model's tokenizer"
            )
