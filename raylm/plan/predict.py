"""Every layout a config may run on N ranks, each with its predicted memory, step time, tokens/s and MFU.

A layout is (pp, tp, dp, zero_stage, micro_batch, activation_checkpointing, cp). It is valid when the config,
with those values, passes the layout checks `raylm config` applies (raylm.config.validate.check_layout): the
planner has no rules of its own. It fits when its largest rank's predicted memory is within the rank's.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from raylm.config.derived import padded_vocab
from raylm.config.layout import Layout
from raylm.config.schema import Config, ModelConfig
from raylm.config.validate import check_layout
from raylm.errors import ConfigError
from raylm.model.facts import flops_per_token
from raylm.parallel.ds_config import zero_stage_for
from raylm.plan.hardware import Hardware
from raylm.plan.memory import DTYPE_BYTES, Memory, RankSetup, rank_memory
from raylm.plan.stages import model_shape, stages
from raylm.plan.timing import Placement, StepTime, step_time

GB = 1e9
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Prediction:
    """One layout and what the planner predicts for it (memory and time None when the layout is invalid)."""

    pp: int
    tp: int
    dp: int
    zero_stage: int  # as configured
    micro_batch: int
    activation_checkpointing: bool
    parameters: int
    why: str = ""  # why the layout is out ('' when it is valid and fits)
    micro_batches: int = 0
    ds_zero_stage: int = 0  # the stage DeepSpeed runs
    memory: Memory | None = None
    time: StepTime | None = None
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    mem_limit: float = 0.0
    cp: int = 1  # context-parallel ranks per replica (Ulysses)

    @property
    def valid(self) -> bool:
        return self.memory is not None

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.mem_limit

    def overrides(self) -> list[str]:
        """The dotted overrides that select this layout."""
        return [
            f"parallel.pp={self.pp}",
            f"parallel.cp={self.cp}",
            f"parallel.tp={self.tp}",
            f"parallel.dp={self.dp}",
            f"parallel.zero_stage={self.zero_stage}",
            f"parallel.micro_batch={self.micro_batch}",
            f"parallel.activation_checkpointing={str(self.activation_checkpointing).lower()}",
        ]


def with_layout(
    cfg: Config, pp: int, tp: int, dp: int, zero: int, micro_batch: int, ckpt: bool, cp: int = 1
) -> Config:
    """`cfg` with another layout (a fixed one: no elastic range, no fixed worker count)."""
    parallel = dataclasses.replace(
        cfg.parallel,
        pp=pp,
        cp=cp,
        tp=tp,
        dp=dp,
        dp_min=0,
        dp_max=0,
        num_workers=0,
        zero_stage=zero,
        micro_batch=micro_batch,
        activation_checkpointing=ckpt,
    )
    return dataclasses.replace(cfg, parallel=parallel)


def predict(cfg: Config, hw: Hardware, gpus_per_node: int) -> Prediction:
    """The prediction for `cfg`'s own layout (its parallel section as it stands)."""
    p = cfg.parallel
    base = Prediction(
        pp=p.pp,
        tp=p.tp,
        dp=p.dp,
        zero_stage=p.zero_stage,
        micro_batch=p.micro_batch,
        activation_checkpointing=p.activation_checkpointing,
        parameters=model_shape(cfg, 1).total_params,
        mem_limit=hw.mem_bytes,
        cp=p.cp,
    )
    try:
        check_layout(cfg)
    except ConfigError as exc:
        return dataclasses.replace(base, why=str(exc))
    shape = model_shape(cfg, p.tp)
    stage_list = stages(shape, p.pp, p.partition)
    micro_batches = cfg.train.global_batch // (p.micro_batch * p.dp)
    setup = RankSetup(
        pp=p.pp,
        tp=p.tp,
        dp=p.dp,
        zero_stage=zero_stage_for(p, cfg.train.precision),
        micro_batch=p.micro_batch,
        micro_batches=micro_batches,
        checkpointing=p.activation_checkpointing,
        precision=cfg.train.precision,
        sequence_parallel=p.sequence_parallel,
        document_mask=cfg.data.document_mask,
        cp=p.cp,
    )
    world = Layout.of(p).world_size
    place = Placement(gpus_per_node=gpus_per_node, tp=p.tp, dp=p.dp, world=world, cp=p.cp)
    if hw.cores_per_node:  # CPU ranks share their node's memory
        base = dataclasses.replace(base, mem_limit=hw.mem_bytes / place.ranks_per_node)
    fused = not hw.cores_per_node  # raylm steps a fused AdamW on GPUs (raylm.parallel.engine)
    memory = rank_memory(shape, stage_list, setup, hw.framework_bytes, fused)
    grad_e = DTYPE_BYTES[cfg.train.precision if p.grad_comm_dtype == "auto" else p.grad_comm_dtype]
    time = step_time(shape, stage_list, setup, hw, place, grad_e)
    tokens_per_s = cfg.train.global_batch * cfg.data.seq_len / time.total
    flops = _flops_per_token(cfg.model, padded_vocab(cfg.data.vocab_size), cfg.data.seq_len)
    peak = hw.peak(cfg.train.precision) * (world if not hw.cores_per_node else world / place.ranks_per_node)
    out = dataclasses.replace(
        base,
        micro_batches=micro_batches,
        ds_zero_stage=setup.zero_stage,
        memory=memory,
        time=time,
        tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * flops / peak,
    )
    if not out.fits:
        out = dataclasses.replace(out, why=oom_reason(memory, out.mem_limit))
    return out


@functools.lru_cache(maxsize=16)
def _flops_per_token(model: ModelConfig, vocab: int, seq_len: int) -> int:
    """raylm.model.facts.flops_per_token (MFU's count), once per model."""
    return flops_per_token(model, vocab, seq_len)


def oom_reason(memory: Memory, limit: float) -> str:
    return f"predicted {memory.total / GB:.1f} GB per rank (stage {memory.stage}) of {limit / GB:.1f} GB"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


Candidate = tuple[int, int, int, int, int, bool, int]  # (pp, tp, dp, zero, micro_batch, checkpointing, cp)


def candidate_layouts(cfg: Config, world: int) -> list[Candidate]:
    """(pp, tp, dp, zero, micro_batch, checkpointing, cp) over world ranks: each distinct ZeRO stage DeepSpeed
    would run, power-of-two micro-batches (and the config's own) that divide the batch, checkpointing off and
    on, and every cp the rest leaves room for (the layout checks refuse those the heads or pp do not allow)."""
    out: list[Candidate] = []
    gb = cfg.train.global_batch
    for pp in divisors(world):
        for tp in divisors(world // pp):
            for cp in divisors(world // (pp * tp)):
                dp = world // (pp * tp * cp)
                sizes = sorted({cfg.parallel.micro_batch, *(2**i for i in range(7))})
                micro = [mb for mb in sizes if mb <= MAX_MICRO_BATCH and gb % (mb * dp) == 0] or [1]
                for zero in _zero_stages(cfg, pp, tp, dp, cp):
                    out.extend((pp, tp, dp, zero, mb, ckpt, cp) for mb in micro for ckpt in (False, True))
    return out


def _zero_stages(cfg: Config, pp: int, tp: int, dp: int, cp: int) -> list[int]:
    """Each distinct ZeRO stage DeepSpeed would run for the degrees, named by itself where it can be."""
    stages_run: dict[int, int] = {}
    for zero in (0, 1, 2, 3):
        probe = dataclasses.replace(cfg.parallel, pp=pp, tp=tp, dp=dp, cp=cp, zero_stage=zero)
        runs = zero_stage_for(probe, cfg.train.precision)
        if runs == zero or runs not in stages_run:
            stages_run[runs] = zero
    return sorted(stages_run.values())


def plan(cfg: Config, hw: Hardware, world: int, gpus_per_node: int) -> list[Prediction]:
    """Every candidate layout's prediction, best first: fitting layouts by tokens/s, then those that do not fit
    by memory, then invalid ones. A (pp, tp, dp) the layout checks refuse is listed once."""
    out: list[Prediction] = []
    refused: set[tuple[int, int, int, int]] = set()
    for pp, tp, dp, zero, mb, ckpt, cp in candidate_layouts(cfg, world):
        if (pp, tp, dp, cp) in refused:
            continue
        pred = predict(with_layout(cfg, pp, tp, dp, zero, mb, ckpt, cp), hw, gpus_per_node)
        if not pred.valid and "micro_batch" not in pred.why:
            refused.add((pp, tp, dp, cp))
        out.append(pred)
    return sorted(out, key=rank_key)


def rank_key(pred: Prediction) -> tuple:
    if pred.fits:
        return (0, -pred.tokens_per_s, pred.memory.total if pred.memory else 0)
    if pred.valid:
        return (1, pred.memory.total if pred.memory else 0, 0)
    return (2, pred.pp, pred.tp, pred.cp)
