"""Values derived from the config in exactly one place: FFN width, padded vocab, kv heads, micro-batch counts,
the DP sizes an elastic run may take."""

from __future__ import annotations

import math

from raylm.config.schema import Config, ModelConfig, ParallelConfig

VOCAB_PAD_MULTIPLE = 128  # layout-independent, so every (pp, tp, dp) builds the same full model


def ffn_hidden(model: ModelConfig) -> int:
    """SwiGLU inner width: the configured one, or 8/3 d_model rounded up to a multiple of 64."""
    if model.ffn_hidden:
        return model.ffn_hidden
    return -(-(8 * model.d_model // 3) // 64) * 64


def kv_heads(model: ModelConfig) -> int:
    """Key/value heads: n_kv_head, or n_head when grouped-query attention is off."""
    return model.n_kv_head or model.n_head


def padded_vocab(vocab_size: int) -> int:
    """Embedding rows: the tokenizer's vocab rounded up to a multiple of 128 (rows past vocab_size are never targets)."""
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def num_workers(cfg: Config) -> int:
    """Ray Train workers: one per (pp, tp, dp) rank (the product is Topology's)."""
    from raylm.parallel.topology import Topology  # it imports this module

    return Topology.from_config(cfg.parallel).world_size


def is_elastic(parallel: ParallelConfig) -> bool:
    """True when the DP size may change during the run (parallel.dp: [min, max] with min < max)."""
    return 0 < parallel.dp_min < parallel.dp_max


def dp_sizes(parallel: ParallelConfig) -> range:
    """Every DP size the run may train with: dp_min..dp_max when elastic, else dp alone."""
    return range(parallel.dp_min, parallel.dp_max + 1) if is_elastic(parallel) else range(parallel.dp, parallel.dp + 1)


def replica_workers(parallel: ParallelConfig) -> int:
    """Workers of one DP replica (pp * tp): an elastic worker group grows and shrinks by whole multiples of it."""
    return parallel.pp * parallel.tp


def worker_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) Ray Train workers: pp * tp * dp_min and pp * tp * dp_max, or num_workers twice when fixed."""
    sizes = dp_sizes(cfg.parallel)
    return replica_workers(cfg.parallel) * sizes[0], replica_workers(cfg.parallel) * sizes[-1]


def batch_quantum(parallel: ParallelConfig) -> int:
    """What every global batch must be a multiple of: micro_batch * dp for each dp the run may take."""
    return parallel.micro_batch * math.lcm(*dp_sizes(parallel))


def samples_per_micro_step(cfg: Config) -> int:
    """Samples consumed by one micro-batch across all DP ranks."""
    return cfg.parallel.micro_batch * cfg.parallel.dp


def eval_samples(cfg: Config) -> int:
    """Validation samples per evaluation: train.eval_samples, or eval_batches global batches of the final size."""
    return cfg.train.eval_samples or cfg.train.eval_batches * cfg.train.global_batch


def micro_batches_for(global_batch: int, cfg: Config) -> int:
    """Micro-batches (gradient accumulation steps) per DP rank for a global batch."""
    return global_batch // samples_per_micro_step(cfg)
