"""One rank's training engine: layout -> TP layers -> PipelineModule -> deepspeed.initialize, behind a small API.

The training loop calls, on every rank:

    init_distributed("gloo")                       # once per process, before anything else here
    engine = build_engine(cfg, weights=None)       # None = SeededInit(cfg.model, vocab, cfg.run.seed)
    loss = engine.train_batch(data_iter)           # data_iter yields (inputs, labels) on reading ranks, else None
"""

from __future__ import annotations

import os
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist

from raylm.config.derived import padded_vocab
from raylm.config.schema import Config, OptimConfig
from raylm.model.weights import InMemoryWeights, SeededInit, WeightSource
from raylm.parallel.ds_config import build_ds_config
from raylm.parallel.pipe_wait import PipeWaitClock
from raylm.parallel.pipeline import build_pipeline_module, gather_full_weights, load_weights, tag_for_grad_norm
from raylm.parallel.tensor import TPGroup
from raylm.parallel.topology import Topology, build_groups, check_layout

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each LongTensor (micro_batch, seq_len)


def resolve_backend(backend: str) -> str:
    """'auto' -> nccl when CUDA is present, else gloo."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto") -> None:
    """Join (or adopt) the default process group the DeepSpeed way; needed before build_engine.

    Expects the usual env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun and Ray Train set.
    """
    # PipelineModule reads LOCAL_RANK to pick its device; a one-device-per-process worker is local rank 0
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=resolve_backend(backend))


def build_optimizer(module: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (norm gains are not decayed)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # a stage may hold no norm (e.g. the embedding alone)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


class Engine:
    """A DeepSpeed pipeline engine plus raylm's layout and full-weight I/O; the same calls on every rank."""

    def __init__(self, ds_engine, optimizer: torch.optim.Optimizer, cfg: Config, topo: Topology, tp: TPGroup):
        self.ds = ds_engine
        self.optimizer = optimizer
        self.cfg = cfg
        self.topo = topo
        self.tp = tp
        self.rank = dist.get_rank()
        self.coords = topo.coords(self.rank)
        self.vocab_size = padded_vocab(cfg.data.vocab_size)
        self.pipe_wait = PipeWaitClock(ds_engine)

    @property
    def reads_data(self) -> bool:
        """Whether this rank must be given batches (first or last pipeline stage)."""
        return self.topo.reads_data(self.rank)

    @property
    def micro_batches(self) -> int:
        """Micro-batches (gradient accumulation steps) per DP rank per optimizer step."""
        return self.ds.gradient_accumulation_steps()

    def _data(self, data_iter: Iterator[Batch] | None) -> Iterator[Batch] | None:
        if self.reads_data and data_iter is None:
            raise ValueError(f"rank {self.rank} {self.coords} is on the first or last pipeline stage and "
                             f"needs a data iterator of (inputs, labels) micro-batches")
        return data_iter if self.reads_data else None

    def train_batch(self, data_iter: Iterator[Batch] | None) -> float:
        """One optimizer step over `micro_batches` micro-batches per DP rank; the loss is the global-batch
        mean (mean of the micro-batch means), identical on every rank."""
        return float(self.ds.train_batch(self._data(data_iter)))

    def take_pipe_wait_s(self) -> float:
        """Seconds this stage spent waiting on other stages since the last call (the bubble plus transfers)."""
        return self.pipe_wait.take_wait_s()

    def eval_batch(self, data_iter: Iterator[Batch] | None, num_micro_batches: int) -> float:
        """Mean loss over `num_micro_batches` micro-batches per DP rank, without gradients; same on every rank."""
        return float(self.ds.eval_batch(self._data(data_iter), num_micro_batches=num_micro_batches))

    def set_lr(self, lr: float) -> None:
        """Learning rate for the next step (the schedule is computed by the caller)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_micro_batches(self, micro_batches: int) -> None:
        """Batch ramp: change the accumulation steps, keeping parallel.micro_batch samples per micro-batch."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1")
        self.ds.set_train_batch_size(micro_batches * self.cfg.parallel.micro_batch * self.topo.dp)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights under the model's names, on every rank (all ranks must call)."""
        return gather_full_weights(self.ds.module, self.cfg, self.vocab_size, self.topo, self.tp)

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load full weights into this rank's shards and master copies (optimizer moments are kept)."""
        load_weights(self.ds.module, InMemoryWeights(full), self.tp)


def build_engine(cfg: Config, weights: WeightSource | None = None) -> Engine:
    """Build this rank's engine for `cfg` (all ranks call together, after init_distributed)."""
    topo = Topology.from_config(cfg.parallel, dist.get_world_size())
    check_layout(topo, cfg)
    groups = build_groups(topo)
    tp = TPGroup(groups.tp, topo.coords(dist.get_rank()).tp_rank, topo.tp)
    vocab_size = padded_vocab(cfg.data.vocab_size)
    module = build_pipeline_module(cfg, vocab_size, topo, tp)
    # each rank reads only its stage's parameters, and of those its TP slice; before initialize, so ZeRO
    # copies the right masters
    load_weights(module, weights if weights is not None else SeededInit(cfg.model, vocab_size, cfg.run.seed), tp)
    tag_for_grad_norm(module, tp)
    optimizer = build_optimizer(module, cfg.optim)
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=build_ds_config(cfg))
    return Engine(ds_engine, optimizer, cfg, topo, tp)
