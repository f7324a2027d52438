"""The typed config tree: one frozen dataclass per section, each field with a one-line doc and a default.

A field that takes one of a fixed set of values declares them beside its doc (`choices=`); the first is the
example its error names. raylm.config.validate checks every such field from here (`field_choices`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from raylm.log import LOG_LEVELS

LAYOUT_CHOICES = ("manual", "auto")  # parallel.layout
TRACKERS = ("tensorboard", "mlflow", "wandb")  # run.trackers
INTERVAL_CHOICES = ("steps", "auto")  # checkpoint.interval; `checkpoint.every_steps: auto` is its shorthand


def opt(default: Any, doc: str, choices: tuple = (), key: str = "") -> Any:
    """A dataclass field with a default and the doc line that `raylm config --help` prints; `choices`: the
    only values it takes (checked by raylm.config.validate); `key`: its name in YAML when that is a Python
    keyword (`checkpoint.async` is the field `async_save`)."""
    metadata: dict[str, Any] = {"doc": doc, "choices": choices} if choices else {"doc": doc}
    if key:
        metadata["key"] = key
    if isinstance(
        default, dict
    ):  # a mapping cannot be hashed: the section's hash skips it, equality keeps it
        return field(default_factory=lambda: dict(default), metadata=metadata, hash=False)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def key_of(f: dataclasses.Field) -> str:
    """A field's name in YAML and in dotted overrides (its own name unless opt() gave another)."""
    return f.metadata.get("key", f.name)


def section(cls: type, doc: str) -> Any:
    """A nested section field whose default is the section's own defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass(frozen=True)
class RunConfig:
    name: str = opt(
        "tiny", "run name; the run folder is <run.dir>/<run.name> (letters, digits, '.', '_', '-')"
    )
    dir: str = opt(
        "runs",
        "folder or s3://, gs:// prefix that holds run folders (on a cluster: object storage or a "
        "shared filesystem)",
    )
    seed: int = opt(1234, "seed for weight init, data order and sampling")
    log_level: str = opt(
        "info",
        "console: info (raylm's progress, evaluations, warnings, summary) | debug (also "
        "every Ray and DeepSpeed line; same as --verbose)",
        choices=LOG_LEVELS,
    )
    trackers: list = opt(
        ["tensorboard"],
        "where rank 0 also sends every metrics.jsonl row: any of tensorboard (<run>/tensorboard), mlflow "
        "(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), wandb (WANDB_* variables); [] = metrics.jsonl alone",
    )


@dataclass(frozen=True)
class DataConfig:
    paths: list = opt(
        [], "text files, folders or globs to prepare; empty = this Python's standard-library sources"
    )
    sources: list = opt(
        [], "weighted mixture of prepared folders: [{path: DIR, weight: W}, ...]; empty = out_dir alone"
    )
    out_dir: str = opt(
        "data/tiny",
        "folder or s3://, gs:// prefix where `raylm prepare` writes the tokenizer, shards and manifest.json",
    )
    cache_dir: str = opt(
        "",
        "node-local folder for shards fetched from s3:// or gs:// data; '' = "
        "<system temp folder>/raylm-cache",
    )
    tokenizer: str = opt("", "an existing tokenizer.json to use instead of training one")
    vocab_size: int = opt(2048, "tokenizer vocabulary size (byte-level BPE, >= 259)")
    seq_len: int = opt(128, "tokens per training sample (windows of seq_len + 1 tokens)")
    val_fraction: float = opt(
        0.02, "share of documents held out for validation, chosen by a stable hash of the doc id"
    )
    text_field: str = opt("text", "field that holds the text in JSON Lines records and Parquet rows")
    decode_errors: str = opt(
        "replace",
        "undecodable bytes: replace (and count) | strict (fail naming the file)",
        choices=("replace", "strict"),
    )
    shard_tokens: int = opt(1 << 20, "target tokens per shard file")
    max_doc_bytes: int = opt(1 << 22, "documents larger than this are read in pieces of this many bytes")
    document_mask: bool = opt(
        False,
        "attention stays within each document of a packed window (causal per document, as Llama 3 "
        "trained); off: plain causal attention over the whole window, which keeps the fused causal kernel "
        "(docs/long-sequences.md says why)",
    )
    document_positions: str = opt(
        "continue",
        "with document_mask, RoPE positions: continue (the window's 0..T-1, as Llama 3's reference code "
        "and torchtitan) | restart (0 at each document's first token)",
        choices=("continue", "restart"),
    )


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention query heads")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 = n_head")
    d_model: int = opt(128, "hidden width")
    ffn_hidden: int = opt(0, "SwiGLU inner width; 0 = 8/3 d_model rounded up to a multiple of 64")
    max_seq_len: int = opt(256, "longest sequence the RoPE tables cover")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    rope_scaling: dict = opt(
        {},
        "RoPE context extension with transformers' keys: rope_type (llama3 | linear | yarn) and its "
        "parameters, e.g. {rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
        "original_max_position_embeddings: 8192}; {} = plain RoPE",
    )
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = opt(True, "share the token embedding with the LM head")
    init_std: float = opt(
        0.02, "std of the normal weight init (output projections scaled by 1/sqrt(2 n_layer))"
    )
    init_from: str = opt(
        "",
        "start from this Hugging Face Llama folder (config.json + safetensors, e.g. a `raylm "
        "export`) instead of seeded weights; its shapes must match this section; '' = fresh",
    )


@dataclass(frozen=True)
class ParallelConfig:
    layout: str = opt(
        "manual",
        "manual (pp, tp, dp, zero_stage, micro_batch and activation_checkpointing as given) | auto (raylm "
        "train takes the layout `raylm plan` predicts fastest among those that fit, on the cluster's GPUs or "
        "parallel.num_workers ranks, and logs the prediction)",
        choices=LAYOUT_CHOICES,
    )
    pp: int = opt(1, "pipeline-parallel stages")
    tp: int = opt(1, "tensor-parallel ranks per stage (Megatron column/row split)")
    sequence_parallel: bool = opt(
        False,
        "with tp > 1: split the norms' and residual stream's activations along the sequence over the TP ranks "
        "(Megatron sequence parallelism: all-gather before and reduce-scatter after each TP region)",
    )
    cp: int = opt(
        1,
        "context-parallel ranks per DP replica (DeepSpeed-Ulysses, pp = 1 only): each holds seq_len / cp "
        "positions of every window and an all-to-all over heads gives each the whole sequence for "
        "n_head / (tp * cp) heads in attention; n_kv_head / tp must be a multiple of cp",
    )
    dp: int = opt(
        1,
        "data-parallel replicas (ZeRO over this group); `dp: [min, max]` makes the run elastic (sets "
        "dp_min and dp_max; dp is then the replicas the current worker group holds)",
    )
    dp_min: int = opt(0, "elastic runs: fewest data-parallel replicas the run trains with (0 = not elastic)")
    dp_max: int = opt(
        0,
        "elastic runs: most data-parallel replicas; the worker group grows to pp * cp * tp * dp_max "
        "workers when the cluster has room (0 = not elastic)",
    )
    num_workers: int = opt(0, "Ray Train workers; 0 = pp * cp * tp * dp (set it to have the product checked)")
    zero_stage: int = opt(
        0, "ZeRO stage over the DP group: 0 or 1 (2 and 3 only when pp = 1)", choices=(0, 1, 2, 3)
    )
    micro_batch: int = opt(4, "samples per micro-batch per DP rank")
    partition: str = opt(
        "compute",
        "how layers are split into pipeline stages: compute (balance FLOPs) | parameters | uniform",
        choices=("compute", "parameters", "uniform"),
    )
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass")
    grad_comm_dtype: str = opt(
        "auto",
        "dtype DP gradient reductions travel in: auto (train.precision's) | fp32 | "
        "bf16 (half fp32's bytes; each rank's gradient rounds to bf16)",
        choices=("auto", "fp32", "bf16"),
    )
    backend: str = opt(
        "auto",
        "torch.distributed backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo",
        choices=("auto", "nccl", "gloo"),
    )
    use_gpu: str = opt(
        "auto", "auto (GPUs when the cluster has them) | true | false", choices=("auto", "true", "false")
    )
    cpus_per_worker: float = opt(
        0.0, "CPUs reserved per worker; 0 = auto (fractional on CPU nodes to leave CPUs for Ray Data)"
    )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = opt(200, "optimizer steps to run")
    global_batch: int = opt(16, "samples per optimizer step across all DP ranks (the ramp's end size)")
    eval_every: int = opt(50, "evaluate on the validation split every N steps (0 = only at the end)")
    eval_batches: int = opt(4, "global batches of validation data per evaluation (when eval_samples is 0)")
    eval_samples: int = opt(
        0,
        "validation samples per evaluation, the same whatever the batch size or its ramp "
        "(a multiple of micro_batch * dp); 0 = eval_batches * global_batch",
    )
    precision: str = opt("fp32", "fp32 | bf16 (bf16 compute, fp32 master weights)", choices=("fp32", "bf16"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    log_every: int = opt(1, "append a metrics.jsonl line every N steps")
    report_every: int = opt(
        25, "send metrics to Ray every N steps (each report costs a controller round trip)"
    )
    torch_threads: int = opt(0, "torch CPU threads per worker; 0 = node cores / workers on the node")
    compile: bool = opt(
        False,
        "torch.compile each transformer block (fuses norms, RoPE and SwiGLU); compiling "
        "takes seconds to minutes at start",
    )
    peak_tflops: float = opt(
        0.0,
        "MFU denominator per worker in TFLOP/s; 0 = the GPU's dense peak from raylm's "
        "table (bf16, or TF32 for fp32 runs), or a matmul measured on CPU",
    )
    profile_steps: list = opt(
        [],
        "[START, END]: record torch.profiler traces of steps START..END (0-based, both included) on every "
        "rank into <run>/profile/; [] = off",
    )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(3e-3, "peak learning rate")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")


@dataclass(frozen=True)
class LrScheduleConfig:
    kind: str = opt(
        "cosine",
        "constant | linear | cosine | wsd (warmup-stable-decay) | plateau (cut on stalled val_loss)",
        choices=("constant", "linear", "cosine", "wsd", "plateau"),
    )
    warmup_steps: int = opt(10, "steps of linear warmup from 0 to optim.lr")
    min_lr_frac: float = opt(0.1, "floor of the decay, as a fraction of optim.lr")
    decay_frac: float = opt(0.2, "wsd: share of the steps spent decaying at the end")
    decay_shape: str = opt(
        "linear",
        "wsd: shape of the final decay: linear | cosine | sqrt",
        choices=("linear", "cosine", "sqrt"),
    )
    factor: float = opt(0.5, "plateau: multiply the lr by this when val_loss stalls (0 < factor < 1)")
    patience: int = opt(2, "plateau: evaluations without improvement before the lr is cut")
    threshold: float = opt(0.01, "plateau: relative val_loss drop that counts as an improvement")


@dataclass(frozen=True)
class BatchScheduleConfig:
    start: int = opt(0, "global batch at step 0; 0 = no ramp (train.global_batch throughout)")
    increment: int = opt(0, "samples added at each ramp stage (a multiple of micro_batch * dp)")
    ramp_tokens: int = opt(0, "tokens over which the batch grows from start to train.global_batch")


@dataclass(frozen=True)
class SeqLenScheduleConfig:
    start: int = opt(
        0,
        "window length at step 0, data.seq_len divided by a power of two; 0 = no warm-up (data.seq_len "
        "throughout). Tokens per step stay constant: a step at window L cuts each sample's data.seq_len "
        "tokens into data.seq_len / L consecutive windows, so micro-batches hold more, shorter rows",
    )
    warmup_steps: int = opt(
        0, "optimizer steps over which the window doubles from start to data.seq_len, in equal stages"
    )


@dataclass(frozen=True)
class ScheduleConfig:
    lr: LrScheduleConfig = section(LrScheduleConfig, "learning-rate schedule")
    batch: BatchScheduleConfig = section(BatchScheduleConfig, "batch-size ramp-up")
    seq_len: SeqLenScheduleConfig = section(
        SeqLenScheduleConfig, "sequence-length warm-up (docs/long-sequences.md)"
    )


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = opt(
        0,
        "save a checkpoint every N steps (0 = only at the end); `auto` sets checkpoint.interval=auto",
    )
    interval: str = opt(
        "steps",
        "steps (every checkpoint.every_steps) | auto (Young/Daly: every sqrt(2 x save time x MTBF), from the "
        "first save's measured time, the step time and fault.mtbf_hours)",
        choices=INTERVAL_CHOICES,
    )
    keep: int = opt(2, "newest committed checkpoints kept")
    async_save: bool = opt(
        True,
        "save in the background: the step that saves copies the state to host memory and training goes on "
        "while a thread per rank writes, hashes and uploads; the manifest commits once every rank is done "
        "(at most one save in flight; the last step's save and the end of training wait for it)",
        key="async",
    )
    writer_nice: int = opt(
        0,
        "nice value (0-19, Linux) of each rank's background writer thread: 19 leaves the cores to the step "
        "first (on 2 cores the steps lost 0.38-0.54 of a save in the loop against 0.40-0.58 at 0), but where "
        "the step keeps every core busy the save then commits many steps later",
    )
    resume: str = opt(
        "auto",
        "auto (newest committed checkpoint of this run) | never | required",
        choices=("auto", "never", "required"),
    )


@dataclass(frozen=True)
class FaultConfig:
    max_failures: int = opt(0, "worker-group restarts Ray Train allows before the run fails")
    mtbf_hours: float = opt(
        6000.0,
        "mean time between failures of one node, in hours; the job's is this / its nodes "
        "(checkpoint.every_steps=auto)",
    )
    drill: str = opt(
        "",
        "fault drills, each once per run (tests only): 'PHASE@STEP[:RANK]' SIGKILLs rank RANK "
        "(default fault.drill_rank) at checkpoint-save phase PHASE (before-files|mid-files|"
        "before-commit|after-commit) of step STEP, 'step@STEP' right after that step; "
        "'nonfinite@STEP' makes one micro-batch's loss NaN on that rank in step STEP; 'spike@STEP' "
        "multiplies step STEP's lr by 1000; 'slow@STEP' makes that rank sleep 0.5 s after every step "
        "from STEP on (a straggler), 'stop@STEP' SIGSTOPs it after step STEP (a hang); "
        "'read@STEP' holds the first Ray Data read task of the "
        "training stream opened at STEP (for a test to kill it); comma-separated for several; "
        "'' = off",
    )
    drill_rank: int = opt(0, "the rank the fault drill kills or poisons")
    nonfinite: str = opt(
        "skip",
        "a non-finite loss or gradient on any rank, found before the optimizer step: stop "
        "(exit 1 naming step and rank, weights unchanged) | skip (no update; the step's "
        "samples are logged as skipped) | rollback (reload the last checkpoint, skip its "
        "samples since)",
        choices=("stop", "skip", "rollback"),
    )
    spike_sigma: float = opt(
        6.0,
        "a loss this many standard deviations above the mean of the last spike_window "
        "losses is a spike; 0 = off",
    )
    spike_window: int = opt(50, "losses in the rolling mean and deviation spikes are measured against")
    spike: str = opt(
        "warn",
        "a loss spike: warn (a `spike` metrics row and a warning) | rollback (also reload the "
        "last checkpoint and skip its samples since)",
        choices=("warn", "rollback"),
    )
    collective_timeout_s: int = opt(
        1800,
        "seconds a collective may wait for a stalled rank before the worker group "
        "fails (and restarts under max_failures)",
    )
    hang_s: float = opt(
        0.0,
        "seconds without a finished step after which every rank writes its Python stack to "
        "<run>/hangs/ and the worker group fails (and restarts under max_failures); 0 = only "
        "at a collective timeout. Keep it above the slowest step, evaluation and checkpoint save",
    )
    straggler_factor: float = opt(
        1.5, "a rank whose work per step exceeds this many times the median rank's is a straggler"
    )
    straggler_steps: int = opt(
        3, "consecutive steps a rank must straggle before the console names it (once per run)"
    )
    resize_check_s: float = opt(
        60.0,
        "elastic runs: seconds between checks whether the cluster fits another "
        "number of DP replicas (Ray Train's elastic_resize_monitor_interval_s)",
    )


@dataclass(frozen=True)
class TuneConfig:
    name: str = opt("sweep", "sweep name; results go to <run.dir>/<tune.name>")
    num_samples: int = opt(4, "trials to sample from the search space (each grid point this many times)")
    metric: str = opt("val_loss", "metric the sweep minimises")
    budget_tokens: int = opt(
        0, "tokens every trial trains; 0 = train.max_steps * global_batch * seq_len of the base"
    )
    search: str = opt(
        "random",
        "random | grid (the space's grid and random keys, Tune's variant generator) | optuna",
        choices=("random", "grid", "optuna"),
    )
    scheduler: str = opt(
        "asha",
        "asha (stop weak trials at equal tokens) | pbt | fifo (every trial to the budget)",
        choices=("asha", "pbt", "fifo"),
    )
    max_concurrent: int = opt(0, "trials run at once; 0 = as many as fit (GPUs / workers, or CPUs / workers)")
    max_failures: int = opt(
        0, "restarts of a failed trial (and of its worker group) before it counts as an error"
    )
    grace_tokens: int = opt(
        0, "ASHA: tokens of the first rung, before which no trial is stopped; 0 = budget / 9"
    )
    reduction_factor: int = opt(
        3, "ASHA: rungs lie at grace * factor^k tokens; a rung keeps the best 1/factor"
    )
    trial_of: str = opt(
        "", "set by raylm sweep in a trial's config: the sweep it belongs to ('' = a plain run)"
    )
    rung_tokens: list = opt(
        [],
        "set by raylm sweep: evaluate, report and checkpoint at the first step whose tokens "
        "reach each of these",
    )
    parent_run: str = opt(
        "", "set by raylm sweep: the sweep's MLflow run, under which each trial's MLflow run nests"
    )
    start_from: str = opt(
        "",
        "set by PBT: a folder holding the donor's committed checkpoint, used when the run "
        "folder has none of its own",
    )


@dataclass(frozen=True)
class Config:
    run: RunConfig = section(RunConfig, "run identity and storage")
    data: DataConfig = section(DataConfig, "corpus, tokenizer and shards")
    model: ModelConfig = section(ModelConfig, "GPT architecture")
    parallel: ParallelConfig = section(ParallelConfig, "pipeline, tensor and data parallel layout")
    train: TrainConfig = section(TrainConfig, "training loop")
    optim: OptimConfig = section(OptimConfig, "AdamW")
    schedule: ScheduleConfig = section(
        ScheduleConfig, "learning-rate, batch-size and sequence-length schedules"
    )
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoint cadence and resume policy")
    fault: FaultConfig = section(FaultConfig, "fault tolerance")
    tune: TuneConfig = section(TuneConfig, "Ray Tune sweeps")


def field_choices(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, tuple]]:
    """(dotted key, value, choices) of every field of a config (or section) that declares its choices, in
    schema order."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from field_choices(value, f"{prefix}{key_of(f)}.")
        elif "choices" in f.metadata:
            yield f"{prefix}{key_of(f)}", value, f.metadata["choices"]
