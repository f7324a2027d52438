"""Facts the other floors number and weigh the model by: layer names and order, training FLOPs per token.

Layer order: [embedding, block 0 .. block L-1, final norm, head]; raylm.parallel.pipeline builds the layers in
this order and checkpoints file each layer's parameters under its index.
"""

from __future__ import annotations

import math

import torch

from raylm.config.schema import ModelConfig
from raylm.model.gpt import param_count, param_shapes


def layer_name(param_name: str) -> str:
    """The pipeline layer a full parameter name belongs to: 'tok_embeddings', 'layers.3', 'norm', 'output'."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def layer_index(param_name: str, n_layer: int) -> int:
    """Position in the layer order of the layer owning a parameter (tied: the embedding, 0)."""
    name = layer_name(param_name)
    if name.startswith("layers."):
        return 1 + int(name.split(".")[1])
    return {"tok_embeddings": 0, "norm": n_layer + 1, "output": n_layer + 2}[name]


def model_layers(model: ModelConfig, vocab_size: int) -> dict[int, dict[str, torch.Size]]:
    """Every layer of the whole model: {layer index: {full name: full shape}}, in layer order."""
    layers: dict[int, dict[str, torch.Size]] = {}
    for name, shape in param_shapes(model, vocab_size).items():
        layers.setdefault(layer_index(name, model.n_layer), {})[name] = shape
    return dict(sorted(layers.items()))


def layer_costs(cfg: ModelConfig, vocab_size: int, seq_len: int) -> list[int]:
    """Training FLOPs per token of each layer, in layer order: what `parallel.partition=compute` balances.

    A block costs 6 x its weights plus its attention scores; the head 6·V·d; the embedding (a lookup) and the
    final norm nothing. Parameter counts would weigh the embedding like the head and leave the last stage
    the slowest, and the slowest stage sets the pipeline's pace."""
    shapes = param_shapes(cfg, vocab_size)
    block_weights = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("layers.0."))
    block = 6 * block_weights + 12 * cfg.d_model * seq_len
    return [0, *[block] * cfg.n_layer, 0, 6 * vocab_size * cfg.d_model]


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12·L·d·T (PaLM appendix B): weights fwd+bwd plus attention scores.

    N counts the weights that take part in a matmul: an untied input embedding is a lookup and is left out
    (a tied one is counted once, as the LM head)."""
    lookup = 0 if cfg.tie_embeddings else vocab_size * cfg.d_model
    return 6 * (param_count(cfg, vocab_size) - lookup) + 12 * cfg.n_layer * cfg.d_model * seq_len
