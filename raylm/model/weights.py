"""Where a rank's starting weights come from: one parameter, or one tensor-parallel slice of it, at a time.

The parallel engine asks a WeightSource only for the parameters its own pipeline stage holds, and only for its
own TP slice, so no rank ever materializes the whole model:

    source = starting_weights(cfg)   # SeededInit, or HFWeights over model.init_from (raylm.model.hf_weights)
    shard = source.read("layers.3.attention.wq.weight", Shard(dim=0, index=tp_rank, count=tp))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from raylm.config.derived import padded_vocab
from raylm.config.schema import Config, ModelConfig
from raylm.errors import ConfigError, RaylmError
from raylm.model.gpt import init_param, param_shapes
from raylm.model.hf_weights import open_hf_weights
from raylm.model.weight_source import Shard, WeightSource


class SeededInit:
    """Fresh weights as a pure function of (config, seed, name): the same values under every layout."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seed: int):
        self.cfg, self.seed = cfg, seed
        self.vocab_size = vocab_size
        self.shapes = param_shapes(cfg, vocab_size)

    def read(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        full = init_param(self.cfg, self.shapes[name], self.seed, name)
        return full if shard is None else shard.of(full)


class InMemoryWeights:
    """A full state dict already in memory (tests, a checkpoint read on one process)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def read(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        full = self.state[name].float()
        return full if shard is None else shard.of(full)


def starting_weights(cfg: Config) -> WeightSource:
    """The weights a fresh run starts from: the Hugging Face Llama folder in model.init_from (checked against
    the model config), else drawn from (model config, run.seed)."""
    vocab_rows = padded_vocab(cfg.data.vocab_size)
    if cfg.model.init_from:
        return open_hf_weights(cfg.model.init_from, cfg.model, vocab_rows, label=init_from_label(cfg.model))
    return SeededInit(cfg.model, vocab_rows, cfg.run.seed)


def init_from_label(model: ModelConfig) -> str:
    """How errors about model.init_from name it."""
    return f"model.init_from={model.init_from}"


def check_init_from(cfg: Config) -> Config:
    """model.init_from must be a Llama folder whose tensors fit this model (headers only: no weights are
    read); ConfigError otherwise. `raylm` commands and raylm.train.driver.train call it once the config is
    built."""
    if cfg.model.init_from:
        try:
            open_hf_weights(
                cfg.model.init_from, cfg.model, padded_vocab(cfg.data.vocab_size), init_from_label(cfg.model)
            )
        except RaylmError as exc:
            raise ConfigError(str(exc)) from None
    return cfg
