"""One rank's training engine: layout -> TP layers -> pipeline or single-stage module -> deepspeed.initialize.

The training loop calls, on every rank:

    init_distributed("gloo")                       # once per process, before anything else here
    engine = build_engine(cfg, weights=None)       # None = SeededInit(cfg.model, vocab, cfg.run.seed)
    loss = engine.train_batch(data_iter)           # data_iter yields (inputs, labels) on reading ranks, else None

With pp > 1 the engine is a DeepSpeed PipelineEngine (ZeRO 0 or 1); with pp = 1 it is DeepSpeed's plain engine
over the same layers, which also takes ZeRO-2 and ZeRO-3. Both sit behind the one `Engine` API below, which is
also the only code that touches either engine's internals (checkpoints use save_state / load_state).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.runtime.pipe.topology import PipelineParallelGrid

from raylm.config.schema import Config, ModelConfig, OptimConfig, ParallelConfig
from raylm.model.facts import model_layers
from raylm.model.weight_source import WeightSource
from raylm.model.weights import InMemoryWeights, SeededInit
from raylm.parallel import param_state, sparsity
from raylm.parallel.comm_wait import CommClock, InFlight
from raylm.parallel.context import NO_CP, ContextParallelGrid, CPGroup, gradient_group
from raylm.parallel.ds_config import TrainSpec, build_ds_config, zero_stage_for
from raylm.parallel.full_tensors import (
    StageLayers,
    gather_full,
    named_params,
    owned_cpu,
    read_weights,
    shard_of,
    tag_for_grad_norm,
)
from raylm.parallel.host_alloc import map_large_allocations, release_free_heap
from raylm.parallel.layers import compile_blocks
from raylm.parallel.pipe_wait import PipeWaitClock
from raylm.parallel.pipeline import SingleStage, build_pipeline_module, ds_topology, stage_layers
from raylm.parallel.shared_groups import shared_single_rank_groups
from raylm.parallel.step_guard import StepGuard
from raylm.parallel.tensor import TPGroup
from raylm.parallel.topology import ProcessGroups, Topology, build_groups
from raylm.parallel.zero_init import LayerHook, alias_fp32_masters, layer_partitioner

# (inputs, labels), each LongTensor (micro_batch, seq_len); inputs is (tokens, doc_ids, positions) under
# data.document_mask
Batch = tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]
Tensors = dict[str, torch.Tensor]
Moments = dict[str, Tensors]  # full name -> {"exp_avg": ..., "exp_avg_sq": ...}


def resolve_backend(backend: str) -> str:
    """'auto' -> nccl when CUDA is present, else gloo."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_s: float | None = None) -> None:
    """Join (or adopt) the default process group the DeepSpeed way; needed before build_engine.

    Expects the usual env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun and Ray Train set.
    timeout_s: the collective timeout of a default group created here (None: DeepSpeed's default); a group that
    already exists keeps its own (Ray Train creates it with TorchConfig.timeout_s = fault.collective_timeout_s).
    """
    # PipelineModule reads LOCAL_RANK to pick its device; a one-device-per-process worker is local rank 0
    os.environ.setdefault("LOCAL_RANK", "0")
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=resolve_backend(backend), **timeout)


def build_optimizer(module: nn.Module, optim: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (norm gains are not decayed); `fused` runs torch's
    single-kernel AdamW (on GPUs: one launch per step instead of several per parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    matrices = [
        len(param_state.local_shape(p)) >= 2 for p in params
    ]  # a ZeRO-3 partition is flat: ask its shape
    groups = [
        {
            "params": [p for p, matrix in zip(params, matrices, strict=True) if matrix],
            "weight_decay": optim.weight_decay,
        },
        {
            "params": [p for p, matrix in zip(params, matrices, strict=True) if not matrix],
            "weight_decay": 0.0,
        },
    ]
    groups = [g for g in groups if g["params"]]  # a stage may hold no norm (e.g. the embedding alone)
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )


class Engine:
    """One rank of a DeepSpeed engine plus raylm's layout and full-state I/O; the same calls on every rank."""

    def __init__(
        self,
        ds_engine,
        optimizer: torch.optim.Optimizer,
        topo: Topology,
        groups: ProcessGroups,
        tp: TPGroup,
        layers: StageLayers,
        model: ModelConfig,
        vocab_size: int,
        micro_batch: int,
    ):
        self.ds = ds_engine
        self.optimizer = optimizer
        self.topo = topo
        self.groups = groups
        self.tp = tp
        self.layers = layers
        self.model = model
        self.vocab_size = vocab_size  # padded
        self.micro_batch = micro_batch
        self.rank = dist.get_rank()
        self.coords = topo.coords(self.rank)
        self.guard = StepGuard(ds_engine, list(layers.params.values()))
        self.comm = CommClock.installed()
        self.seq_len = 0  # the window length of the batches since the last set_seq_len (0: none set yet)

    @property
    def computes_loss(self) -> bool:
        """Whether this rank computes micro-batch losses (the last pipeline stage; every rank when pp = 1)."""
        return self.coords.pp_stage == self.topo.pp - 1

    def watch_losses(self, loss_fn) -> None:
        """Route every micro-batch loss through the step guard (non-finite check, fault drill)."""
        loss_fn.on_loss = self.guard.watch_loss

    def take_comm_wait_s(self) -> float:
        """Seconds this rank was blocked in torch.distributed calls since the last take (raylm.parallel.comm_wait)."""
        return self.comm.take_wait_s()

    def collective_in_flight(self) -> InFlight | None:
        """The torch.distributed call this rank is blocked in now, if any (read from another thread)."""
        return self.comm.in_flight

    def poison_next_loss(self) -> None:
        """Fault drill: the next micro-batch loss this rank computes becomes NaN."""
        if not self.computes_loss:
            raise ValueError(f"rank {self.rank} {self.coords} computes no loss")
        self.guard.poison_next = True

    def take_nonfinite_flags(self) -> list[int] | None:
        """After train_batch: every rank's flags (bit 1 loss, bit 2 gradient not finite) when any rank found a
        non-finite value, in which case no rank updated its weights; None for a normal step. Same on every rank."""
        return self.guard.take_flags()

    @property
    def reads_data(self) -> bool:
        """Whether this rank must be given batches (first or last pipeline stage)."""
        return self.topo.reads_data(self.rank)

    @property
    def micro_batches(self) -> int:
        """Micro-batches (gradient accumulation steps) per DP rank per optimizer step."""
        return self.ds.gradient_accumulation_steps()

    @property
    def layout(self) -> dict[str, int]:
        """The degrees a checkpoint's manifest records (cp only when > 1: manifests from before it match)."""
        degrees = {"pp": self.topo.pp, "tp": self.topo.tp, "dp": self.topo.dp}
        return degrees | ({"cp": self.topo.cp} if self.topo.cp > 1 else {})

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live, and where its process group's collectives take their tensors."""
        return torch.device(self.ds.device)

    def _data(self, data_iter: Iterator[Batch] | None) -> Iterator[Batch] | None:
        if self.reads_data and data_iter is None:
            raise ValueError(
                f"rank {self.rank} {self.coords} is on the first or last pipeline stage and "
                f"needs a data iterator of (inputs, labels) micro-batches"
            )
        return data_iter if self.reads_data else None

    def train_batch(self, data_iter: Iterator[Batch] | None) -> float:
        """One optimizer step over `micro_batches` micro-batches per DP rank; the loss is the global-batch
        mean (mean of the micro-batch means), identical on every rank."""
        raise NotImplementedError

    def eval_batch(self, data_iter: Iterator[Batch] | None, num_micro_batches: int) -> float:
        """Mean loss over `num_micro_batches` micro-batches per DP rank, without gradients; same on every rank."""
        raise NotImplementedError

    def take_pipe_wait_s(self) -> float:
        """Seconds this stage spent waiting on other stages since the last call (the bubble plus transfers)."""
        return 0.0

    def set_lr(self, lr: float) -> None:
        """Learning rate for the next step (the schedule is computed by the caller)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_micro_batches(self, micro_batches: int) -> None:
        """Batch ramp: change the accumulation steps, keeping parallel.micro_batch samples per micro-batch."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1")
        self.ds.set_train_batch_size(micro_batches * self.micro_batch * self.topo.dp)

    def set_seq_len(self, seq_len: int) -> None:
        """The window length of the micro-batches from here on (schedule.seq_len; evaluations at data.seq_len):
        every rank calls it with the same value, middle pipeline stages included, which read no data."""
        self.seq_len = seq_len

    # -- full state: every tensor whole and layout-free ------------------------------------------------------

    @property
    def writes_layers(self) -> bool:
        """Whether this rank writes its stage's layers on save: its stage's (dp 0, cp 0, tp 0) rank."""
        return self.coords.dp_rank == 0 and self.coords.cp_rank == 0 and self.coords.tp_rank == 0

    def layer_indices(self, owned_only: bool) -> list[int]:
        """Pipeline layer indices this rank holds (owned_only: those its stage saves; a tied copy is not)."""
        return list(self.layers.by_layer(owned_only))

    def full_state_dict(self) -> Tensors:
        """Full fp32 CPU weights under the model's names, on every rank (all ranks must call): each stage gathers
        its own layers, then the stage's (dp 0, tp 0) rank broadcasts each tensor."""
        full, owned = {}, self.layers.by_layer(owned_only=True)
        for index, shapes in model_layers(self.model, self.vocab_size).items():
            owner, mine = self.layers.stage_of(index), owned.get(index)
            for name, shape in shapes.items():
                value = (
                    gather_full(mine[name], self.tp) if mine else torch.empty(shape, device=self.ds.device)
                )
                dist.broadcast(value, src=self.topo.rank_of(owner, 0, 0))
                full[name] = owned_cpu(value)
        return full

    def load_full_state_dict(self, full: Tensors) -> None:
        """Load full weights into this rank's shards and master copies (optimizer moments are kept); every rank
        calls."""
        self.read_weights(InMemoryWeights(full))

    def read_weights(self, source: WeightSource) -> None:
        """Read this rank's slice of every parameter it holds from `source` into its shards and master copies, one
        parameter at a time (optimizer moments are kept); every rank calls (ZeRO-3 re-gathers its whole-kept
        weights at the end)."""
        read_weights(self.layers.params, source, self.tp)
        param_state.sync_zero3_weights(self.ds.optimizer)

    def save_state(
        self,
        write_layer: Callable[[int, Tensors, Moments], None],
        to_host: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict:
        """Gather each layer this stage owns, one at a time (DP and TP collectives: every rank calls), and on the
        stage's writer rank hand it to write_layer(index, weights, moments). `to_host(key, tensor)` makes each
        CPU fp32 copy (key: the parameter's name, or name/moment), fresh ones by default; the other ranks take
        part in the gathers and copy nothing. Returns the optimizer's scalars (AdamW step, learning rate,
        DeepSpeed's counters), the same on every rank."""
        param_state.ensure_adam_state(self.optimizer, self.ds.optimizer)
        copy = to_host or (lambda key, t: owned_cpu(t))
        if not self.writes_layers:
            copy = lambda key, t: t  # noqa: E731
        for index, params in self.layers.by_layer(owned_only=True).items():
            weights = {name: copy(name, gather_full(param, self.tp)) for name, param in params.items()}
            moments = {
                name: {
                    **{
                        key: copy(f"{name}/{key}", t)
                        for key, t in gather_full(param, self.tp, self.optimizer).items()
                    },
                    **sparsity.full_mask_entry(param, self.tp),
                }  # pruning masks travel with the moments
                for name, param in params.items()
            }
            if self.writes_layers:
                write_layer(index, weights, moments)
        ds = self.ds
        return {
            "adam_step": param_state.adam_step(self.optimizer),
            "lr": self.optimizer.param_groups[0]["lr"],
            "global_steps": ds.global_steps,
            "global_samples": ds.global_samples,
            "skipped_steps": ds.skipped_steps,
        }

    def load_state(
        self, read_layer: Callable[[int], tuple[Tensors, Moments | None]], scalars: dict | None
    ) -> None:
        """Load every layer this rank holds from read_layer(index) -> (full weights, full moments or None), keeping
        this rank's TP slice and ZeRO partition (every rank calls: ZeRO-3 re-gathers its whole-kept weights at the
        end). `scalars` are save_state's; None starts AdamW
        fresh (a weights-only checkpoint)."""
        param_state.ensure_adam_state(self.optimizer, self.ds.optimizer)
        for index, params in self.layers.by_layer(owned_only=False).items():
            weights, moments = read_layer(index)
            for name, param in params.items():
                param_state.set_master_value(param, shard_of(weights[name], param, self.tp))
                if moments is not None:
                    shards = {key: shard_of(t, param, self.tp) for key, t in moments[name].items()}
                    param_state.set_adam_moments(self.optimizer, param, shards)
                    sparsity.load_mask_entry(param, shards)
        param_state.sync_zero3_weights(self.ds.optimizer)
        if scalars is None:
            param_state.reset_adam_moments(self.optimizer)
            return
        param_state.set_adam_step(self.optimizer, scalars["adam_step"])
        self.set_lr(scalars["lr"])
        self.ds.global_steps = scalars["global_steps"]
        self.ds.global_samples = scalars["global_samples"]
        self.ds.skipped_steps = scalars["skipped_steps"]


class PipelineStageEngine(Engine):
    """pp > 1: one stage of DeepSpeed's PipelineEngine (1F1B schedule; ZeRO 0 or 1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipe_wait = PipeWaitClock(self.ds)

    def train_batch(self, data_iter: Iterator[Batch] | None) -> float:
        return float(self.ds.train_batch(self._data(data_iter)))

    def eval_batch(self, data_iter: Iterator[Batch] | None, num_micro_batches: int) -> float:
        with self.guard.not_training():
            return float(self.ds.eval_batch(self._data(data_iter), num_micro_batches=num_micro_batches))

    def take_pipe_wait_s(self) -> float:
        return self.pipe_wait.take_wait_s()

    def set_seq_len(self, seq_len: int) -> None:
        """DeepSpeed's pipeline sends the shapes of stage activations once and keeps its receive buffers: when
        the window changes, every stage drops them together, so the next micro-batch sends the new shapes."""
        if self.seq_len and seq_len != self.seq_len:
            self.ds.reset_activation_shape()
        super().set_seq_len(seq_len)


class SingleStageEngine(Engine):
    """pp = 1: DeepSpeed's plain engine over the whole layer list (ZeRO 0 to 3); forward/backward/step here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.topo.dp * self.topo.cp == 1 and not self.ds.zero_optimization():
            # without ZeRO DeepSpeed all-reduces the gradients over DP (x CP) even for one rank: flattening every
            # gradient into buckets and copying it back, twice the gradients' bytes per step for nothing
            self.ds.enable_backward_allreduce = False

    def train_batch(self, data_iter: Iterator[Batch] | None) -> float:
        data_iter = self._data(data_iter)
        assert data_iter is not None  # pp = 1: every rank reads data (_data says so when it has none)
        losses, micro_batches = [], self.micro_batches
        for i in range(micro_batches):
            # the boundary is set, not counted: DeepSpeed's micro-step count would drift when a ramp changes m
            self.ds.set_gradient_accumulation_boundary(i == micro_batches - 1)
            inputs, labels = next(data_iter)
            loss = self.ds(_to(inputs, self.ds.device), labels.to(self.ds.device))
            self.ds.backward(loss)  # scaled by 1 / micro_batches; DP-reduced at the boundary
            losses.append(loss.detach())
        self.ds.step()
        return self._dp_mean(losses)

    def eval_batch(self, data_iter: Iterator[Batch] | None, num_micro_batches: int) -> float:
        data_iter = self._data(data_iter)
        assert data_iter is not None  # pp = 1: every rank reads data (_data says so when it has none)
        with torch.no_grad(), self.guard.not_training():
            losses = [
                self.ds(_to(inputs, self.ds.device), labels.to(self.ds.device))
                for inputs, labels in (next(data_iter) for _ in range(num_micro_batches))
            ]
        return self._dp_mean(losses)

    def _dp_mean(self, losses: list[torch.Tensor]) -> float:
        """Mean over micro-batches, then over DP ranks: the pipeline engine's reduction, so both report alike.
        Under CP each rank's loss is its sequence slice's share of the window's: they are summed first."""
        mean = torch.stack(losses).float().mean()
        if self.topo.cp > 1:
            dist.all_reduce(mean, group=self.groups.cp)
        if self.topo.dp > 1:
            dist.all_reduce(mean, group=self.groups.dp)
            mean /= self.topo.dp
        return float(mean)


def _to(inputs: torch.Tensor | tuple[torch.Tensor, ...], device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A micro-batch's inputs (a tensor, or the document-masked tuple) on the engine's device."""
    return tuple(t.to(device) for t in inputs) if isinstance(inputs, tuple) else inputs.to(device)


def build_module(
    model: ModelConfig,
    parallel: ParallelConfig,
    spec: TrainSpec,
    topo: Topology,
    tp: TPGroup,
    on_built: LayerHook | None = None,
    cp: CPGroup = NO_CP,
) -> tuple[nn.Module, StageLayers]:
    """This rank's module (a pipeline stage, or the whole model when pp = 1) and its layers by full name;
    `on_built` (pp = 1 only) runs on each layer as soon as it is built; `cp` (pp = 1 only) splits each
    window's positions."""
    recompute = parallel.activation_checkpointing
    if topo.pp == 1:
        module = SingleStage(model, spec.vocab_size, tp, recompute, on_built, cp)
        return module, StageLayers(named_params(module.stage_layers()), 0, lambda index: 0, model.n_layer)
    pipe = build_pipeline_module(
        model, spec.vocab_size, spec.seq_len, parallel.partition, recompute, topo, tp
    )
    return pipe, StageLayers(named_params(stage_layers(pipe)), pipe.stage_id, pipe.stage_owner, model.n_layer)


def build_engine(cfg: Config, weights: WeightSource | None = None) -> Engine:
    """Build this rank's engine for `cfg` (all ranks call together, after init_distributed). It reads the model
    and parallel sections, and from the rest only a TrainSpec; `weights` defaults to the run's seeded init."""
    spec = TrainSpec.from_config(cfg)
    topo = Topology.from_config(cfg.parallel, dist.get_world_size())
    topo.check_model(cfg.model, cfg.data.vocab_size, cfg.parallel.zero_stage, cfg.data.seq_len)
    # raylm's groups and DeepSpeed's: one per single rank (fewer gloo threads), each with the collective timeout
    with shared_single_rank_groups(timedelta(seconds=cfg.fault.collective_timeout_s)):
        return _build_engine(cfg, spec, topo, weights)


def _build_engine(cfg: Config, spec: TrainSpec, topo: Topology, weights: WeightSource | None) -> Engine:
    groups = build_groups(topo)
    coords = topo.coords(dist.get_rank())
    tp = TPGroup(groups.tp, coords.tp_rank, topo.tp, topo.sequence_parallel)
    cp = CPGroup(groups.cp, coords.cp_rank, topo.cp)
    ds_config = build_ds_config(cfg.parallel, spec)
    mpu = _grid(topo, groups)
    zero_stage = zero_stage_for(cfg.parallel, spec.precision)
    zero3 = zero_stage == 3  # only with pp = 1 (Layout.check_model)
    if zero3 and not torch.cuda.is_available():
        map_large_allocations()  # before the stage is built: ZeRO-3 gathers and frees every layer every step
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    partitioner = layer_partitioner(ds_config, mpu, gradient_group(mpu), dtype) if zero3 else None
    module, layers = build_module(cfg.model, cfg.parallel, spec, topo, tp, partitioner, cp)
    # each rank reads only its stage's parameters, and of those its TP slice (its ZeRO-3 partitions, once they
    # exist); masks first: a pruned start trains with its pruned weights held at 0
    weights = weights if weights is not None else SeededInit(cfg.model, spec.vocab_size, cfg.run.seed)
    sparsity.read_masks(layers.params, weights, tp)
    if not zero3:  # into the whole parameters, before initialize copies them into DeepSpeed's masters
        read_weights(layers.params, weights, tp)
    tag_for_grad_norm(module, tp)
    if spec.compile_blocks:
        compile_blocks(module)
    optimizer = build_optimizer(module, spec.optim, fused=torch.cuda.is_available())
    ds_engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=mpu, config=ds_config)
    if zero_stage in (1, 2) and not torch.cuda.is_available():
        release_free_heap()  # initialize copied every parameter into flat buffers and freed the originals
    engine_class = SingleStageEngine if topo.pp == 1 else PipelineStageEngine
    engine = engine_class(
        ds_engine, optimizer, topo, groups, tp, layers, cfg.model, spec.vocab_size, cfg.parallel.micro_batch
    )
    if zero3:  # the layers were partitioned empty: each rank writes its partition of every master
        alias_fp32_masters(ds_engine.optimizer)
        engine.read_weights(weights)
    engine.watch_losses(module.loss_fn)
    return engine


def _grid(topo: Topology, groups: ProcessGroups) -> PipelineParallelGrid | None:
    """With pp = 1, the mpu DeepSpeed learns the TP and DP groups from: a grid over the same topology the pipeline
    uses, with a sequence axis under context parallelism. None with pp > 1 (the PipelineModule brings its own)."""
    if topo.pp > 1:
        return None
    if topo.cp > 1:
        return ContextParallelGrid(topo, groups)
    return PipelineParallelGrid(topology=ds_topology(topo))
