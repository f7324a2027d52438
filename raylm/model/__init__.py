"""The single-device GPT (no distributed code): layers, full-weight init and FLOP counts."""

from raylm.model.facts import flops_per_token
from raylm.model.gpt import GPT, init_full_weights, param_count, param_shapes

__all__ = ["GPT", "flops_per_token", "init_full_weights", "param_count", "param_shapes"]
