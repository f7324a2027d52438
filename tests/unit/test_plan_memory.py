"""The planner's memory model against DeepSpeed's own estimators, the ZeRO paper's bytes per parameter, and the
tensors autograd really keeps for a block's backward."""

import pytest
import torch

from raylm.config.derived import ffn_hidden
from raylm.config.schema import ModelConfig
from raylm.data.documents import document_ids, document_positions
from raylm.model.gpt import Block, document_attention
from raylm.model.rope import rope_tables
from raylm.plan.memory import DTYPE_BYTES, RankSetup, block_activation_bytes, model_state_bytes
from raylm.plan.stages import ModelShape

N = 1_000_000  # parameters; bytes per parameter = bytes / N


def setup(
    dp: int, zero: int, precision: str = "bf16", pp: int = 1, tp: int = 1, document_mask: bool = False
) -> RankSetup:
    return RankSetup(
        pp=pp,
        tp=tp,
        dp=dp,
        zero_stage=zero,
        micro_batch=1,
        micro_batches=1,
        checkpointing=False,
        precision=precision,
        document_mask=document_mask,
    )


def per_param(dp: int, zero: int, precision: str = "bf16", pp: int = 1) -> float:
    return sum(model_state_bytes(N, setup(dp, zero, precision, pp))) / N


@pytest.mark.parametrize("dp", [1, 2, 4, 8, 64])
def test_mixed_precision_adam_is_the_zero_papers_bytes_plus_deepspeeds_fp32_gradient_partition(dp):
    # ZeRO paper (Rajbhandari et al. 2020, fig. 1): 2 + 2 + 12 = 16 bytes per parameter, K = 12 partitioned at
    # stage 1, gradients too at stage 2, everything at stage 3. DeepSpeed's stages 1 and 2 also flatten the
    # reduced gradient partition into fp32 for the step: 4 / dp more.
    assert per_param(dp, 1) == pytest.approx(2 + 2 + 12 / dp + 4 / dp)
    assert per_param(dp, 2) == pytest.approx(2 + (2 + 12) / dp + 4 / dp)
    assert per_param(dp, 3) == pytest.approx(16 / dp)


@pytest.mark.parametrize("dp", [1, 2, 4, 8, 64])
def test_zero2_equals_deepspeeds_estimator(dp):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = 123_587_328
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, cpu_offload=False)
    ours = sum(model_state_bytes(params, setup(dp, 2)))
    assert ours == pytest.approx(gpu_bytes, rel=1e-6)


@pytest.mark.parametrize("dp", [1, 2, 8, 64])
def test_zero3_lies_between_the_paper_and_deepspeeds_upper_estimate(dp):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params, largest = 1_000_000_000, 50_000_000
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=dp, cpu_offload=False, cpu_offload_params=False
    )
    ours = sum(model_state_bytes(params, setup(dp, 3)))
    assert 16 * params / dp == pytest.approx(ours)
    assert ours <= gpu_bytes  # DeepSpeed adds 4 x the largest layer and counts 18 bytes per parameter


def test_fp32_keeps_one_copy_at_zero0_and_aliases_its_masters_at_zero3():
    assert per_param(1, 0, "fp32") == 16  # weights are the masters, gradients are fp32
    assert per_param(4, 3, "fp32") == pytest.approx(16 / 4)  # raylm points the masters at the weights
    assert per_param(4, 1, "fp32") == pytest.approx(4 + 4 + 16 / 4)  # a fp32 partition copy and its gradient


def test_bf16_pipeline_at_zero0_holds_bf16_optimizers_full_fp32_gradients():
    # DeepSpeed's BF16_Optimizer (pp > 1, ZeRO 0): bf16 weights and gradients, every gradient accumulated in
    # fp32, masters and moments partitioned over DP like ZeRO-1
    assert per_param(4, 0, "bf16", pp=2) == pytest.approx(2 + 2 + 4 + 12 / 4)


def saved_activation_bytes(block: torch.nn.Module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for block(*inputs)'s backward, its own weights left out
    (also measured on sequence-parallel ranks: tests/distributed/dist_tp_checks.py)."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(*inputs)
    return sum(seen.values())


class MaskedBlock(torch.nn.Module):
    """A block as the engine runs it under data.document_mask (raylm.parallel.layers): it builds its own mask
    and RoPE tables from the window's document ids and positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block = Block(cfg)
        self.cos, self.sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, 1e4)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask, cos, sin = document_attention(doc_ids, positions, self.cos, self.sin)
        return self.block(x, cos, sin, mask=mask)


@pytest.mark.parametrize("document_mask", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "d,heads,kv,batch,seq",
    [(256, 4, 4, 2, 64), (256, 8, 2, 2, 128), (384, 6, 3, 1, 96), (64, 2, 2, 2, 512)],  # the last: T >> d
)
def test_block_activations_match_what_autograd_saves(document_mask, precision, d, heads, kv, batch, seq):
    cfg = ModelConfig(n_layer=1, n_head=heads, n_kv_head=kv, d_model=d, max_seq_len=seq)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    x = torch.randn(batch, seq, d, dtype=dtype, requires_grad=True)
    if document_mask:  # documents of 20 tokens, each ended by EOT (0)
        tokens = (torch.arange(batch * seq).reshape(batch, seq) % 20 != 19).long().numpy()
        doc_ids, positions = document_ids(tokens), document_positions(tokens, "restart")
        block = MaskedBlock(cfg).to(dtype)
        measured = saved_activation_bytes(block, x, torch.from_numpy(doc_ids), torch.from_numpy(positions))
    else:
        cos, sin = rope_tables(d // heads, seq, 1e4)
        measured = saved_activation_bytes(Block(cfg).to(dtype), x, cos, sin)
    shape = ModelShape(
        params=(0, 0, 0, 0),
        shard_params=(0, 0, 0, 0),
        flops=(0, 0, 0, 0),
        tied=True,
        d_model=d,
        kv_dim=kv * (d // heads),
        ffn=ffn_hidden(cfg),
        n_head=heads,
        vocab=512,
        seq_len=seq,
    )
    predicted = block_activation_bytes(
        shape, batch * seq, setup(1, 0, precision, document_mask=document_mask)
    )
    assert predicted == pytest.approx(measured, rel=0.03)
    assert DTYPE_BYTES[precision] == dtype.itemsize


# benchmarks/memory.py's measured peak RSS above an idle rank, over 16 bytes per parameter of the rank's shard,
# on the 24-layer d=1024 fp32 model (docs/parallelism.md "Memory")
MEASURED_RSS_VS_IDEAL = {
    (1, 1, 1, 0): 1.11,
    (2, 1, 1, 1): 1.13,
    (4, 1, 1, 1): 1.17,
    (1, 2, 1, 0): 1.12,
    (1, 1, 2, 3): 1.22,
}


@pytest.mark.parametrize("layout", sorted(MEASURED_RSS_VS_IDEAL))
def test_cpu_predictions_are_within_ten_percent_of_the_memory_benchmarks_measurements(layout):
    from raylm.config import resolve
    from raylm.plan.calibrate import hardware_of, machine_key
    from raylm.plan.predict import predict
    from raylm.plan.stages import model_shape, stages

    pp, tp, dp, zero = layout
    cfg = resolve(
        {
            "data": {"vocab_size": 2048, "seq_len": 128},
            "model": {"n_layer": 24, "n_head": 16, "d_model": 1024, "max_seq_len": 128},
            "parallel": {"micro_batch": 1, "pp": pp, "tp": tp, "dp": dp, "zero_stage": zero},
            "train": {"precision": "fp32", "global_batch": dp},
        }
    )
    figures = dict.fromkeys(("matmul_fp32", "matmul_bf16", "mem_bw", "allreduce_bw", "send_bw"), 1e9)
    figures.update(key=machine_key(), ram_bytes=64e9, latency_s=0.0, sync_wait_s=0.0, idle_rank_bytes=0.4e9)
    pred = predict(cfg, hardware_of(figures), gpus_per_node=pp * tp * dp)
    assert pred.memory is not None
    n = stages(model_shape(cfg, tp), pp, cfg.parallel.partition)[pred.memory.stage].params
    ideal = (
        n * 4 / (dp if zero >= 3 else 1) + n * 4 / (dp if zero >= 2 else 1) + n * 8 / (dp if zero >= 1 else 1)
    )
    predicted = (pred.memory.total - pred.memory.framework) / ideal
    assert predicted == pytest.approx(MEASURED_RSS_VS_IDEAL[layout], rel=0.1)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes that tensors the ops under it allocate (not their inputs, not in-place results) hold at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves(args)
            if torch.is_tensor(a)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs and t.numel() > 1:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def test_torch_adamw_holds_the_temporaries_the_planner_counts():
    """raylm's CPU AdamW (unfused, one flat partition under ZeRO-1/2) keeps ADAM_TEMP_BYTES per element alive at
    its step's peak: the second moment's square root and its quotient by the bias correction."""
    from raylm.plan.memory import ADAM_TEMP_BYTES

    param = torch.nn.Parameter(torch.zeros(N))
    param.grad = torch.ones(N)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    optimizer.step()  # the moments are made at the first step; the second is every later one
    with _LiveBytes() as live:
        optimizer.step()
    assert live.peak == ADAM_TEMP_BYTES * N
