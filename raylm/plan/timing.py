"""Predicted step time of one layout: compute, the 1F1B bubble, TP collectives, pipeline sends, Ulysses'
all-to-alls, DP reductions.

The slowest stage sets the pipeline's pace: a step is m slots of that stage's micro-batch time (matmuls at the
hardware's peak x matmul_eff, the memory-bound elementwise work at its memory bandwidth, a fixed cost per block,
plus its TP collectives and its sends, none overlapped) and one slot of each other stage, 1F1B's fill and
drain: with equal stages that is m + p - 1 slots, the bubble (p - 1) / (m + p - 1). Then the DP gradient
reduction, which DeepSpeed runs after the last micro-batch (raylm sets no overlap_comm, so ZeRO 1 and 2 and the
pipeline engine do not overlap it; ZeRO-3 reduce-scatters during the backward and gathers each layer,
unprefetched, before its use), the tied-embedding all-reduce between the end stages, and the optimizer step,
which reads and writes its state at memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.plan.hardware import Hardware
from raylm.plan.memory import DTYPE_BYTES, RankSetup, block_activation_bytes
from raylm.plan.stages import ModelShape, Stage

OPTIMIZER_BYTES_PER_ELEMENT = (
    40  # AdamW over fp32 state: master, two moments and the temporary read and written
)
# TP collectives of one block's forward and backward, as raylm.parallel.tensor runs them. Each row-parallel layer
# (wo, w2) all-reduces its output forward; each column-parallel layer (wq, wk, wv, w1, w3) enters the TP region
# through its own copy, whose backward all-reduces the input's gradient: 2 + 5 all-reduces. Under sequence
# parallelism the two norms gather the sequence once each and the row-parallel layers reduce-scatter it, forward
# and backward: 8 half collectives (4 all-reduces' worth of bytes), plus the norms' gain gradients (d elements).
TP_ALLREDUCES_PER_BLOCK = 7
SP_HALVES_PER_BLOCK = 8
SP_SMALL_PER_BLOCK = 2
TP_RECOMPUTE_ALLREDUCES = (
    2  # a recomputed forward repeats its two (or, under SP, its 2 gathers and 2 scatters)
)
LOSS_SMALL_ALLREDUCES = 2  # the vocab-parallel cross-entropy's row max and its sums, (N,) and (2, N)
# Ulysses: q, k, v into attention and its output back, forward; their gradients the other way, backward
CP_ALL_TO_ALLS_FORWARD = 4
ELEMENTWISE_PASSES = (
    3  # saved activations are written in the forward, read and their gradients written backward
)


@dataclass(frozen=True)
class Placement:
    """Where a layout's groups fall on nodes of `gpus_per_node` ranks (rank order: pp, dp, cp, tp)."""

    gpus_per_node: int
    tp: int
    dp: int
    world: int
    cp: int = 1

    @property
    def tp_intra(self) -> bool:
        return self.tp <= self.gpus_per_node

    @property
    def cp_intra(self) -> bool:
        return self.cp * self.tp <= self.gpus_per_node

    @property
    def dp_intra(self) -> bool:
        return self.tp * self.cp * self.dp <= self.gpus_per_node

    @property
    def pp_intra(self) -> bool:  # neighbouring stages are dp * cp * tp ranks apart
        return self.tp * self.cp * self.dp < self.gpus_per_node

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus_per_node, self.world)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step, by part."""

    compute_s: float  # the slowest stage's micro-batches, m of them
    bubble_s: (
        float  # 1F1B's fill and drain: a slot of each other stage (p - 1 of its own when stages are equal)
    )
    tp_s: float  # TP collectives over the step (inside the slots)
    p2p_s: float  # pipeline sends over the step (inside the slots)
    dp_s: float  # exposed DP gradient reduction and ZeRO gathers
    optimizer_s: float
    bubble: float  # (p - 1) / (m + p - 1)
    cp_s: float = 0.0  # Ulysses' all-to-alls over the step

    @property
    def total(self) -> float:
        return (
            self.compute_s + self.bubble_s + self.tp_s + self.p2p_s + self.cp_s + self.dp_s + self.optimizer_s
        )


def ring_allreduce_s(nbytes: float, ranks: int, bw: float, hw: Hardware) -> float:
    """A ring all-reduce: 2 (n - 1) / n of the bytes through each rank's link, plus 2 (n - 1) latencies."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (bw * hw.link_eff) + 2 * (ranks - 1) * hw.latency_s


def ring_half_s(nbytes: float, ranks: int, bw: float, hw: Hardware) -> float:
    """A reduce-scatter or an all-gather: half an all-reduce."""
    return ring_allreduce_s(nbytes, ranks, bw, hw) / 2


def rank_peak(hw: Hardware, precision: str, place: Placement) -> float:
    """FLOP/s one rank computes at: a GPU's peak, or on CPU the node's matmul peak shared by its ranks."""
    if hw.cores_per_node:
        return hw.peak(precision) / max(1, place.ranks_per_node)
    return hw.peak(precision)


def _saturation(size: float, knee: int) -> float:
    """How near a matmul side of `size` elements comes to the full rate: size / (size + knee)."""
    return size / (size + knee)


def elementwise_s(shape: ModelShape, stage: Stage, setup: RankSetup, hw: Hardware, place: Placement) -> float:
    """The memory-bound part of a micro-batch: norms, RoPE, SwiGLU's gate, residual adds and the loss's softmax
    read and write about what autograd keeps, ELEMENTWISE_PASSES times, at the rank's memory bandwidth."""
    tokens = setup.tokens(shape.seq_len)
    e = DTYPE_BYTES[setup.precision]
    passes = ELEMENTWISE_PASSES + (1 if setup.checkpointing else 0)  # a recomputed forward writes them again
    nbytes = stage.blocks * block_activation_bytes(shape, tokens, setup) * passes
    if stage.last:
        nbytes += ELEMENTWISE_PASSES * (8 + e) * tokens * shape.vocab / setup.tp
    mem_bw = hw.mem_bw / (place.ranks_per_node if hw.cores_per_node else 1)
    return nbytes / mem_bw


def tp_collectives(stage: Stage, setup: RankSetup) -> tuple[float, int, int]:
    """One micro-batch's TP collectives on one stage, forward and backward: (all-reduces' worth of (B, T, C)
    activations, small all-reduces, collectives in all). The first stage adds the embedding's reduction, the last
    the head's input gradient and the loss's two small all-reduces (and under SP the final norm's gather)."""
    recompute = TP_RECOMPUTE_ALLREDUCES if setup.checkpointing else 0
    ends = (1 if stage.first else 0) + (1 if stage.last else 0)
    small = LOSS_SMALL_ALLREDUCES if stage.last else 0
    if not setup.sequence_parallel:
        full = stage.blocks * (TP_ALLREDUCES_PER_BLOCK + recompute) + ends
        return full, small, full + small
    halves = (
        stage.blocks * (SP_HALVES_PER_BLOCK + 2 * recompute) + 2 * ends
    )  # each end: a gather and a scatter
    small += stage.blocks * SP_SMALL_PER_BLOCK + (1 if stage.last else 0)  # the final norm's gain
    return halves / 2, small, halves + small


def tp_collectives_s(
    stage: Stage, setup: RankSetup, activation: float, hw: Hardware, place: Placement
) -> float:
    """Seconds of one micro-batch's TP collectives: their bytes and latencies, and on CPU each one's sync wait."""
    full, small, calls = tp_collectives(stage, setup)
    bw = hw.intra_bw if place.tp_intra else hw.inter_bw
    moved = full * ring_allreduce_s(activation, setup.tp, bw, hw) + small * ring_allreduce_s(
        0.0, setup.tp, bw, hw
    )
    return moved + calls * hw.sync_wait_s


def all_to_all_s(nbytes: float, ranks: int, bw: float, hw: Hardware) -> float:
    """An all-to-all of `nbytes` per rank: (n - 1) / n of them leave through each rank's link, n - 1 latencies."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (bw * hw.link_eff) + (ranks - 1) * hw.latency_s


def ulysses_s(shape: ModelShape, stage: Stage, setup: RankSetup, hw: Hardware, place: Placement) -> float:
    """Seconds of one micro-batch's all-to-alls on one stage: per block q (d), k and v (kv each) and the output
    (d) of this rank's tokens and TP heads, forward, backward and again in a recomputed forward."""
    if setup.cp == 1:
        return 0.0
    tokens, e = setup.tokens(shape.seq_len), DTYPE_BYTES[setup.precision]
    per_block = e * tokens * (2 * shape.d_model + 2 * shape.kv_dim) / setup.tp
    passes = 2 + (1 if setup.checkpointing else 0)
    bw = hw.intra_bw if place.cp_intra else hw.inter_bw
    exchange = all_to_all_s(per_block / CP_ALL_TO_ALLS_FORWARD, setup.cp, bw, hw) + hw.sync_wait_s
    return stage.blocks * passes * CP_ALL_TO_ALLS_FORWARD * exchange


def micro_batch_slot_s(
    shape: ModelShape, stage: Stage, setup: RankSetup, hw: Hardware, place: Placement
) -> tuple[float, float, float]:
    """(compute, TP all-reduce, send) seconds of one micro-batch's forward and backward on one stage."""
    tokens = setup.tokens(shape.seq_len)
    e = DTYPE_BYTES[setup.precision]
    flops = stage.flops_per_token + (stage.block_flops_per_token / 3 if setup.checkpointing else 0)
    width = min(shape.d_model, shape.kv_dim, shape.ffn) / setup.tp
    eff = hw.matmul_eff * _saturation(tokens, hw.matmul_knee) * _saturation(width, hw.matmul_knee)
    compute = tokens * flops / setup.tp / (rank_peak(hw, setup.precision, place) * eff)
    compute += stage.blocks * hw.block_overhead_s * (4 / 3 if setup.checkpointing else 1)
    compute += elementwise_s(shape, stage, setup, hw, place)
    activation = e * tokens * shape.d_model
    tp_s = tp_collectives_s(stage, setup, activation, hw, place) if setup.tp > 1 else 0.0
    sends = (0 if stage.first else 1) + (0 if stage.last else 1)  # each forward out and gradient back
    p2p_bw = hw.p2p_bw if place.pp_intra else hw.inter_bw
    sent = activation / setup.sequence_shards  # under sequence parallelism each TP rank sends its shard
    p2p_s = sends * (sent / (p2p_bw * hw.link_eff) + hw.latency_s) if setup.pp > 1 else 0.0
    return compute, tp_s, p2p_s


def dp_exposed_s(
    stage: Stage, setup: RankSetup, hw: Hardware, place: Placement, grad_e: int, backward_s: float
) -> float:
    """DP communication of one step that no compute hides."""
    d, e, n = setup.zero_ranks, DTYPE_BYTES[setup.precision], stage.params
    if d <= 1:
        return 0.0
    bw = hw.intra_bw if place.dp_intra else hw.inter_bw
    if setup.zero_stage >= 3:  # per micro-batch: gather for forward and backward, reduce-scatter gradients
        gathers = 2 * ring_half_s(e * n, d, bw, hw)
        # under cp raylm has ZeRO-3 all-reduce instead (raylm.parallel.ds_config.zero_optimization)
        reduce = (ring_allreduce_s if setup.cp > 1 else ring_half_s)(grad_e * n, d, bw, hw)
        return setup.micro_batches * (gathers + max(0.0, reduce - backward_s))
    if setup.zero_stage >= 1 or setup.precision == "bf16":  # reduce-scatter gradients, all-gather weights
        return ring_half_s(grad_e * n, d, bw, hw) + ring_half_s(e * n, d, bw, hw)
    return ring_allreduce_s(grad_e * n, d, bw, hw)


def step_time(
    shape: ModelShape,
    stage_list: list[Stage],
    setup: RankSetup,
    hw: Hardware,
    place: Placement,
    grad_e: int,
) -> StepTime:
    """The step time of the slowest stage's ranks (every rank waits for it at the step's end)."""
    m, p = setup.micro_batches, setup.pp
    slots = [micro_batch_slot_s(shape, s, setup, hw, place) for s in stage_list]
    slowest = max(range(len(slots)), key=lambda i: sum(slots[i]))
    compute, tp_s, p2p_s = slots[slowest]
    # 1F1B's fill and drain: the other stages' forward and backward of one micro-batch each, before and after the
    # slowest stage's m (p - 1 of its slots when the stages are equal)
    fill_drain_s = sum((sum(slot) for i, slot in enumerate(slots) if i != slowest), 0.0)
    cp_s = ulysses_s(shape, stage_list[slowest], setup, hw, place)  # pp = 1 with cp > 1: one stage
    bubble_slots = p - 1 if p > 1 else 0
    worst_dp = max(dp_exposed_s(s, setup, hw, place, grad_e, compute * 2 / 3) for s in stage_list)
    tied = 0.0
    if shape.tied and p > 1:  # the end stages all-reduce the tied embedding's gradient
        bw = hw.inter_bw if setup.dp * setup.tp * (p - 1) >= place.gpus_per_node else hw.p2p_bw
        tied = ring_allreduce_s(4 * shape.shard_params[0], 2, bw, hw)
    n_opt = max(s.params for s in stage_list)
    split = setup.zero_ranks if (setup.zero_stage >= 1 or setup.precision == "bf16") else 1
    mem_bw = hw.mem_bw / (place.ranks_per_node if hw.cores_per_node else 1)
    optimizer = OPTIMIZER_BYTES_PER_ELEMENT * n_opt / split / mem_bw
    return StepTime(
        compute_s=m * compute,
        bubble_s=fill_drain_s,
        tp_s=m * tp_s,
        p2p_s=m * p2p_s,
        dp_s=worst_dp + tied,
        optimizer_s=optimizer,
        bubble=bubble_slots / (m + bubble_slots),
        cp_s=m * cp_s,
    )
