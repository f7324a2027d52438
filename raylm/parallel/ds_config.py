"""The DeepSpeed config dict, generated from the typed raylm config (the only place DeepSpeed keys are spelled)."""

from __future__ import annotations

from dataclasses import dataclass

from raylm.config.derived import micro_batches_for, padded_vocab
from raylm.config.schema import Config, OptimConfig, ParallelConfig

REDUCE_BUCKET = 50_000_000  # elements per gradient reduction bucket (200 MB in fp32)
# ZeRO-3 (docs/parallelism.md "Memory"): what a rank holds beyond its partitions. A layer's gathered weights are
# released right after its forward and gathered again for its backward, instead of DeepSpeed's default of keeping
# every parameter reused within 1e9 elements (the whole model, whole, until backward); the optimizer steps the
# partition in sub-groups of ZERO3_SUB_GROUP elements, so its temporaries (a flat gradient copy, AdamW's
# intermediates) are that large rather than the whole partition; and gradients are reduced in buckets of
# ZERO3_REDUCE_BUCKET elements.
ZERO3_SUB_GROUP = 10_000_000
ZERO3_REDUCE_BUCKET = 10_000_000
ZERO3_PREFETCH_BUCKET = 0  # no prefetch: the next layer is gathered when it is reached, not kept alongside
NEVER = 10**9  # steps_per_print: raylm logs its own metrics; DeepSpeed's per-step prints would only add noise


@dataclass(frozen=True)
class TrainSpec:
    """What the engine needs beyond the model and parallel sections, taken from data, train and optim."""

    vocab_size: int  # padded (data.vocab_size rounded up): the embedding's rows
    seq_len: int
    micro_batches: int  # per DP rank per optimizer step, at train.global_batch
    precision: str
    grad_clip: float
    optim: OptimConfig
    compile_blocks: bool  # train.compile

    @classmethod
    def from_config(cls, cfg: Config) -> TrainSpec:
        return cls(
            vocab_size=padded_vocab(cfg.data.vocab_size),
            seq_len=cfg.data.seq_len,
            micro_batches=micro_batches_for(cfg.train.global_batch, cfg),
            precision=cfg.train.precision,
            grad_clip=cfg.train.grad_clip,
            optim=cfg.optim,
            compile_blocks=cfg.train.compile,
        )


def zero_stage_for(p: ParallelConfig, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs: parallel.zero_stage, except in two cases.

    bf16 with pp = 1 runs ZeRO-1 for ZeRO 0: bf16 keeps fp32 master weights and fp32 gradient accumulation, and
    without ZeRO DeepSpeed's plain engine has no optimizer that does (it would accumulate bf16 gradients); the
    pipeline engine's BF16_Optimizer, which it uses at ZeRO 0, partitions the masters over DP exactly as ZeRO-1
    does. So both engines keep the same state.
    fp32 with dp = cp = 1 runs ZeRO 0: ZeRO partitions over the DP (x CP) ranks, and over one it saves nothing, while
    DeepSpeed's flat fp32 copies of the weights and gradients, and AdamW temporaries as large as the whole stage,
    cost about one more model's worth of memory (docs/parallelism.md, "Memory")."""
    if precision == "bf16" and p.pp == 1:
        return max(p.zero_stage, 1)
    if precision == "fp32" and p.dp * p.cp == 1:
        return 0
    return p.zero_stage


def zero_optimization(stage: int, cp: int = 1) -> dict:
    """The zero_optimization section for a ZeRO stage (the ZERO3_* settings above for stage 3).

    ZeRO-3 under context parallelism (cp > 1) reduces with an all-reduce instead of a reduce-scatter: DeepSpeed
    0.19.8's reduce-scatter path (stage3.py `__avg_scatter_grads`, through `reduce_scatter_coalesced`) divides the
    gradients by the whole partition group, dp x cp, where its all-reduce path (`__avg_scatter_contiguous_grads`)
    divides by dp as every other reduction with a sequence axis does; the CP ranks' gradients are parts of one
    sum, so the reduce-scatter's would be cp times too small."""
    if stage < 3:
        return {"stage": stage, "reduce_bucket_size": REDUCE_BUCKET}
    section = {
        "stage": 3,
        "reduce_bucket_size": ZERO3_REDUCE_BUCKET,
        "sub_group_size": ZERO3_SUB_GROUP,
        "stage3_max_reuse_distance": 0,
        "stage3_max_live_parameters": ZERO3_REDUCE_BUCKET,
        "stage3_prefetch_bucket_size": ZERO3_PREFETCH_BUCKET,
    }
    if cp > 1:
        section.update(reduce_scatter=False, contiguous_gradients=True)
    return section


def build_ds_config(p: ParallelConfig, spec: TrainSpec, micro_batches: int | None = None) -> dict:
    """DeepSpeed's JSON config for one run; `micro_batches` defaults to the spec's (train.global_batch's)."""
    micro_batches = micro_batches or spec.micro_batches
    config = {
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": p.micro_batch * micro_batches * p.dp,
        "gradient_clipping": spec.grad_clip,
        # bf16 compute with fp32 master weights and fp32 gradient accumulation
        "bf16": {"enabled": spec.precision == "bf16"},
        # stage 2, 3 only at pp = 1 (check_model). Gradients are reduced in buckets of REDUCE_BUCKET elements:
        # DeepSpeed's default (5e8) holds a model of up to 500M parameters' gradients a second time, whole
        "zero_optimization": zero_optimization(zero_stage_for(p, spec.precision), p.cp),
        # our torch.optim.AdamW is passed in; DeepSpeed would otherwise refuse it under ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
    if p.grad_comm_dtype != "auto":  # auto: DeepSpeed's default, the compute dtype (bf16 under bf16)
        config["communication_data_type"] = p.grad_comm_dtype  # what DP gradient reductions send
    if p.cp > 1:
        # with a sequence axis DeepSpeed reduces gradients in this dtype instead (its default fp32): the same
        # choice as without one
        auto = "bf16" if spec.precision == "bf16" else "fp32"
        config["seq_parallel_communication_data_type"] = (
            auto if p.grad_comm_dtype == "auto" else p.grad_comm_dtype
        )
    if p.pp > 1:
        config["pipeline"] = {
            # each TP rank sends its own activation: the whole one, replicated over TP (DeepSpeed's partitioning
            # would send 1/tp and all-gather it), or under sequence parallelism its own sequence shard
            "pipe_partitioned": False,
            "grad_partitioned": False,
            "activation_checkpoint_interval": 1 if p.activation_checkpointing else 0,
        }
    return config
