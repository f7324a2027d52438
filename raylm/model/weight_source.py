"""WeightSource, what the parallel engine reads starting weights through, and the TP Shard it asks for.

One parameter, or one tensor-parallel Shard of it, at a time; raylm.model.weights and raylm.model.hf_weights
implement it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` equal chunks along `dim`: the part of a full tensor one TP rank holds."""

    dim: int
    index: int
    count: int

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of `full`, as a tensor with its own storage (a view would keep all of `full` alive)."""
        return full.chunk(self.count, dim=self.dim)[self.index].clone()


class WeightSource(Protocol):
    """Full-model fp32 weights under raylm's parameter names, read one parameter (or slice) at a time."""

    def read(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        """The fp32 tensor of parameter `name`, or only `shard` of it."""
        ...
