"""Predicted memory of one rank: model states under the ZeRO stage DeepSpeed runs, activations, buffers, fixed cost.

Bytes per parameter of the rank's shard (N), compute dtype e (4 fp32, 2 bf16), D = dp, as DeepSpeed allocates
them with the settings raylm passes (raylm.parallel.ds_config):

| state | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 |
|---|---|---|---|---|
| working weights | e | e | e | e / D |
| gradients (compute dtype) | e | e | e / D | e / D |
| fp32 gradients | bf16, pp > 1: 4 (BF16_Optimizer's accumulation) | 4 / D | 4 / D | one sub-group |
| fp32 masters | bf16: 4 / D | 4 / D | 4 / D | bf16: 4 / D; fp32: 0 (aliased) |
| AdamW moments | 8 (bf16: 8 / D) | 8 / D | 8 / D | 8 / D |

fp32 at ZeRO 0 keeps no second copy: its weights are the masters and its gradients are fp32. bf16 at ZeRO 0 runs
ZeRO-1 at pp = 1 and the BF16_Optimizer (masters partitioned like ZeRO-1) with a pipeline; fp32 over one DP rank
runs ZeRO 0 (raylm.parallel.ds_config.zero_stage_for). For mixed precision this is the ZeRO paper's
2 + 2 + 12/D (stage 1), 2 + 14/D (2) and 16/D (3) plus DeepSpeed's fp32 gradient partition (4/D) that it builds
for the step at stages 1 and 2, and at stage 2 exactly DeepSpeed's own estimate (2 + 18/D).
Activations per token of one block, measured from the tensors autograd saves (tests/unit/test_plan_memory.py):
each RMSNorm keeps (4 + 2e) x d bytes (its fp32 input, its normalised output and its result), attention keeps
e x (2d + 2 kv) / tp (q and k after RoPE, v, the output) and the SwiGLU MLP 4e x ffn / tp. Sequence parallelism
divides by tp what lies between TP regions: each norm's input and normalised output, a checkpointed block's
input and the pipeline's boundary activations; the norm's result is gathered whole for the layers after it.
Document masks (data.document_mask) add, per block, what SDPA keeps of the (B, 1, T, T) mask it is given:
the additive mask in the compute dtype it converts the boolean one to (e x T per token, on every TP rank: the
mask is the same for every head), and the block's own RoPE tables at each row's positions (cos and sin, fp32,
4 x head size per token); while a block runs (its forward, or its recompute under checkpointing) its boolean
mask, B x T x T bytes, lives beside them; between pipeline stages every micro-batch carries its int64 document
ids and positions (benchmarks/long_sequences.py measures masked steps against these figures).

Context parallelism (cp) divides every token count by cp: a rank holds T / cp positions outside attention, and
inside it T positions of H / cp heads, the same bytes; Ulysses keeps the attention output twice, before and after
the all-to-all that returns it to the slice. ZeRO partitions over the dp x cp ranks (D above).
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.parallel.ds_config import REDUCE_BUCKET, ZERO3_REDUCE_BUCKET, ZERO3_SUB_GROUP
from raylm.plan.stages import ModelShape, Stage

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# torch AdamW's unfused step computes denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): the square
# root and its quotient are two fp32 temporaries alive at once, per element of the tensor it steps
ADAM_TEMP_BYTES = 8
PIPE_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's pipeline engine flattens up to this many gradient elements


@dataclass(frozen=True)
class RankSetup:
    """What memory depends on besides the model: the layout, the batch and the precision."""

    pp: int
    tp: int
    dp: int
    zero_stage: int  # the stage DeepSpeed runs (zero_stage_for), not necessarily the configured one
    micro_batch: int
    micro_batches: int  # per DP rank per step
    checkpointing: bool
    precision: str
    sequence_parallel: bool = False  # activations between TP regions split along the sequence over tp
    document_mask: bool = False  # data.document_mask: every block attends under a (B, 1, T, T) mask
    cp: int = 1  # context-parallel ranks: each holds seq_len / cp positions of every window

    @property
    def zero_ranks(self) -> int:
        """The ranks gradients are reduced over and ZeRO partitions over: dp x cp."""
        return self.dp * self.cp

    def tokens(self, seq_len: int) -> int:
        """Tokens of one micro-batch on one rank: this CP rank's slice of each window."""
        return self.micro_batch * seq_len // self.cp

    @property
    def sequence_shards(self) -> int:
        """What the activations between TP regions are divided by: tp under sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds at its peak (the optimizer step or the deepest point of the 1F1B schedule)."""

    params: float
    grads: float
    optimizer: float  # fp32 masters and AdamW moments, and the step's temporaries
    activations: float
    buffers: float  # DeepSpeed's reduce buckets, ZeRO-3's gathered layer, pipeline send buffers
    framework: float
    stage: int  # which pipeline stage this is

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.framework


def model_state_bytes(n: float, setup: RankSetup) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes for `n` parameters on one rank, without temporaries."""
    e, d, z = DTYPE_BYTES[setup.precision], setup.zero_ranks, setup.zero_stage
    bf16 = setup.precision == "bf16"
    weights = e * n / (d if z >= 3 else 1)
    grads = e * n / (d if z >= 2 else 1)
    if z in (1, 2):
        grads += 4 * n / d  # the fp32 partition DeepSpeed flattens the reduced gradients into for the step
    elif z == 0 and bf16:
        grads += 4 * n  # BF16_Optimizer accumulates every gradient in fp32
    split = d if (z >= 1 or bf16) else 1
    masters = 0.0 if (not bf16 and z in (0, 3)) else 4 * n / split
    return weights, grads, masters + 8 * n / split


def optimizer_temporaries(shape: ModelShape, n: float, setup: RankSetup, fused: bool) -> float:
    """The step's transient bytes: torch AdamW's temporaries (the second moment's square root and its quotient)
    over each tensor it steps. DeepSpeed's ZeRO-1/2 and BF16 optimizers step one flat partition (the whole of it
    at once), ZeRO-3 one sub-group at a time (with its fp32 gradient copy), and plain fp32 at ZeRO 0 each
    parameter on its own (the largest at once). Fused AdamW (raylm's on GPUs) keeps no temporary."""
    split = setup.zero_ranks if (setup.zero_stage >= 1 or setup.precision == "bf16") else 1
    if setup.zero_stage >= 3:
        return (0 if fused else ADAM_TEMP_BYTES) * min(ZERO3_SUB_GROUP, n / split) + 4 * min(
            ZERO3_SUB_GROUP, n / split
        )
    if fused:
        return 0.0
    if setup.zero_stage == 0 and setup.precision == "fp32":
        largest = max(shape.vocab * shape.d_model, shape.d_model * shape.ffn) / setup.tp
        return ADAM_TEMP_BYTES * min(largest, n)
    return ADAM_TEMP_BYTES * n / split


def block_activation_bytes(shape: ModelShape, tokens: int, setup: RankSetup) -> float:
    """What autograd keeps for one transformer block's backward over `tokens` tokens on one TP rank."""
    e, tp, d = DTYPE_BYTES[setup.precision], setup.tp, shape.d_model
    norms = 2 * ((4 + e) / setup.sequence_shards + e) * d
    attention = e * (2 * d + 2 * shape.kv_dim) / tp + 4 * shape.n_head / tp
    if setup.cp > 1:
        attention += e * d / tp  # Ulysses: the output before its all-to-all back, and after it (wo's input)
    mlp = 4 * e * shape.ffn / tp
    documents = e * shape.seq_len + 4 * shape.d_model // shape.n_head if setup.document_mask else 0
    return tokens * (norms + attention + mlp + documents + 8)


def stage_activation_bytes(shape: ModelShape, stage: Stage, setup: RankSetup) -> float:
    """Activations at the stage's peak: the micro-batches 1F1B keeps in flight on it (pp - stage, at most m;
    one without a pipeline), each block's saved tensors (or, under checkpointing, its input, plus one block
    recomputed in the backward), the stage's boundary buffers, and on the last stage the loss's logits."""
    e, tp = DTYPE_BYTES[setup.precision], setup.tp
    tokens = setup.tokens(shape.seq_len)
    block = block_activation_bytes(shape, tokens, setup)
    boundary = e * tokens * shape.d_model / setup.sequence_shards  # one (B, T, C) activation or its gradient
    per_block = boundary if setup.checkpointing else block
    in_flight = min(setup.pp - stage.index, setup.micro_batches) if setup.pp > 1 else 1
    # DeepSpeed's pipeline keeps each in-flight micro-batch's stage input and output
    documents = 2 * 8 * tokens if setup.document_mask else 0  # int64 document ids and positions
    pipe_buffers = 2 * (boundary + documents) if setup.pp > 1 else 0
    kept = in_flight * (stage.blocks * per_block + pipe_buffers)
    transient: float = 2 * boundary  # the gradient flowing back and the one being formed
    if setup.document_mask and stage.blocks:
        transient += tokens * shape.seq_len  # the running block's boolean (B, 1, T, T) mask
    if setup.checkpointing and stage.blocks:
        transient += block
    if stage.last:
        # VocabParallelCE's fp32 softmax, its backward's fp32 copy and the logits' gradient in the compute dtype
        transient += (8 + e) * tokens * shape.vocab / tp
    return kept + transient


def buffer_bytes(shape: ModelShape, stage: Stage, setup: RankSetup) -> float:
    """DeepSpeed's own buffers for the ZeRO stage and engine raylm runs."""
    e, z = DTYPE_BYTES[setup.precision], setup.zero_stage
    n = stage.params
    if z >= 3:  # one gathered layer (weights and gradient) and one reduce bucket
        return 2 * e * shape.largest_layer / setup.tp + e * ZERO3_REDUCE_BUCKET
    if z in (1, 2):
        return e * min(REDUCE_BUCKET, n)
    if (
        setup.zero_ranks > 1
    ):  # ZeRO 0 over DP: the engine flattens gradients into one buffer to all-reduce them
        return e * min(PIPE_ALLREDUCE_BUCKET, n)
    return 0.0


def stage_memory(shape: ModelShape, stage: Stage, setup: RankSetup, framework: float, fused: bool) -> Memory:
    """Every part of one stage's rank's peak memory."""
    weights, grads, optimizer = model_state_bytes(stage.params, setup)
    return Memory(
        params=weights,
        grads=grads,
        optimizer=optimizer + optimizer_temporaries(shape, stage.params, setup, fused),
        activations=stage_activation_bytes(shape, stage, setup),
        buffers=buffer_bytes(shape, stage, setup),
        framework=framework,
        stage=stage.index,
    )


def rank_memory(
    shape: ModelShape, stage_list: list[Stage], setup: RankSetup, framework: float, fused: bool
) -> Memory:
    """The rank that needs the most: the largest stage_memory over the stages."""
    return max((stage_memory(shape, s, setup, framework, fused) for s in stage_list), key=lambda m: m.total)
