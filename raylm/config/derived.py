"""Values derived from the config in exactly one place: FFN width, padded vocab, kv heads, micro-batch counts.

The layout's arithmetic is raylm.config.layout's."""

from __future__ import annotations

from raylm.config.schema import Config, ModelConfig

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
    """Embedding rows: the tokenizer's vocab rounded up to a multiple of 128 (rows past vocab_size are never
    targets)."""
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def samples_per_micro_step(cfg: Config) -> int:
    """Samples consumed by one micro-batch across all DP ranks."""
    return cfg.parallel.micro_batch * cfg.parallel.dp


def eval_samples(cfg: Config) -> int:
    """Validation samples per evaluation: train.eval_samples, or eval_batches global batches of the final size."""
    return cfg.train.eval_samples or cfg.train.eval_batches * cfg.train.global_batch


def micro_batches_for(global_batch: int, cfg: Config) -> int:
    """Micro-batches (gradient accumulation steps) per DP rank for a global batch."""
    return global_batch // samples_per_micro_step(cfg)
