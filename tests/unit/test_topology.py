"""Topology coordinates and groups against DeepSpeed's own topology, layout checks, and the DeepSpeed config."""

from __future__ import annotations

import os
import re

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from raylm.config import resolve
from raylm.errors import ConfigError
from raylm.parallel.ds_config import TrainSpec, build_ds_config
from raylm.parallel.topology import Topology
from tests.conftest import REPO_ROOT

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 2, 3)]


@pytest.mark.parametrize("pp,tp,dp", LAYOUTS)
def test_coords_match_deepspeed(pp, tp, dp):
    topo, ds = Topology(pp, tp, dp), PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(topo.world_size):
        c, ds_c = topo.coords(rank), ds.get_coord(rank)
        assert (c.pp_stage, c.dp_rank, c.tp_rank) == (ds_c.pipe, ds_c.data, ds_c.model)
        assert topo.rank_of(*c) == rank


@pytest.mark.parametrize("pp,tp,dp", LAYOUTS)
def test_groups_partition_the_world_like_deepspeed(pp, tp, dp):
    topo, ds = Topology(pp, tp, dp), PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for axis, ds_axis, size in (("tp", "model", tp), ("dp", "data", dp), ("pp", "pipe", pp)):
        groups = topo.all_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(topo.world_size))
        assert all(len(g) == size for g in groups)
        assert (
            sorted(map(sorted, groups)) == sorted(map(sorted, ds.get_axis_comm_lists(ds_axis))) or size == 1
        )


@pytest.mark.parametrize("tp,dp,cp", [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 2), (1, 3, 4)])
def test_context_parallel_ranks_sit_between_data_and_model(tp, dp, cp):
    """With cp, DeepSpeed's grid over (dp x cp, tp) holds the same ranks: its data axis is raylm's dp x cp (the
    group gradients are summed over), its model axis raylm's TP groups; CP peers are TP groups apart."""
    topo = Topology(1, tp, dp, cp=cp)
    ds = PipeModelDataParallelTopology(num_pp=1, num_mp=tp, num_dp=dp * cp)
    assert topo.world_size == tp * dp * cp
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        assert topo.rank_of(*c) == rank and ds.get_coord(rank).data == c.dp_rank * cp + c.cp_rank
        assert topo.cp_ranks(rank) == [rank - c.cp_rank * tp + s * tp for s in range(cp)]
        assert sorted(topo.dp_cp_ranks(rank)) == sorted(
            next(g for g in ds.get_axis_comm_lists("data") if rank in g)
        )
    for axis, size in (("tp", tp), ("cp", cp), ("dp", dp)):
        groups = topo.all_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(topo.world_size))
        assert all(len(g) == size for g in groups)


def test_context_parallel_limits_are_one_line_each_with_the_fix():
    """Whole KV heads per (TP, CP) rank, a window that splits, and no pipeline: refused when the config is built."""
    cases = [
        (
            ["parallel.cp=2", "parallel.pp=2"],
            "DeepSpeed's pipeline engine has no sequence axis",
            "set parallel.pp=1",
        ),
        (
            ["parallel.cp=4", "model.n_head=4", "model.n_kv_head=2"],
            r"model.n_kv_head=2 / parallel.tp=1 = 2 KV heads per TP rank is not a multiple of parallel.cp=4",
            "pick cp dividing 2",
        ),
        (
            ["parallel.cp=2", "parallel.tp=2", "model.n_head=4", "model.n_kv_head=2"],
            r"= 1 KV heads per TP rank is not a multiple of parallel.cp=2",
            "a smaller tp, or more KV heads",
        ),
        (
            ["parallel.cp=2", "data.seq_len=63"],
            r"data.seq_len=63 is not divisible by parallel.cp = 2",
            "multiple of 2",
        ),
        (
            [
                "parallel.cp=2",
                "parallel.tp=2",
                "parallel.sequence_parallel=true",
                "model.n_kv_head=4",
                "data.seq_len=126",
            ],
            r"not divisible by parallel.cp \* tp = 4",
            "multiple of 4",
        ),
    ]
    for overrides, problem, fix in cases:
        with pytest.raises(ConfigError) as caught:
            resolve({"parallel": {"pp": 1}}, overrides)
        message = str(caught.value)
        assert "\n" not in message and re.search(problem, message) and fix in message, message
    cfg = resolve({}, ["parallel.pp=1", "parallel.cp=2", "parallel.dp=2", "model.n_kv_head=2"])
    topo = Topology.from_config(cfg.parallel, world_size=4)
    assert (topo.cp, topo.replica_size, topo.world_size) == (2, 2, 4)
    with pytest.raises(
        ConfigError, match=r"parallel.pp \* cp \* tp \* dp = 1 \* 2 \* 1 \* 2 = 4 ranks, but 2"
    ):
        Topology.from_config(cfg.parallel, world_size=2)


def test_context_parallel_ds_config_reduces_in_the_compute_dtype():
    """With a sequence axis DeepSpeed reduces gradients in seq_parallel_communication_data_type (fp32 by
    default): raylm sets it as it sets communication_data_type; ZeRO-3 all-reduces (its reduce-scatter divides
    by dp x cp)."""
    for extra, want in (
        ([], "fp32"),
        (["train.precision=bf16"], "bf16"),
        (["parallel.grad_comm_dtype=bf16"], "bf16"),
    ):
        cfg = resolve(
            {}, ["parallel.pp=1", "parallel.cp=2", "model.n_kv_head=2", "parallel.zero_stage=3", *extra]
        )
        ds = build_ds_config(cfg.parallel, TrainSpec.from_config(cfg))
        assert ds["seq_parallel_communication_data_type"] == want
        assert ds["zero_optimization"]["reduce_scatter"] is False
    plain = resolve({}, ["parallel.pp=1", "parallel.dp=2", "parallel.zero_stage=3"])
    ds = build_ds_config(plain.parallel, TrainSpec.from_config(plain))
    assert (
        "seq_parallel_communication_data_type" not in ds and "reduce_scatter" not in ds["zero_optimization"]
    )


def test_pp2_tp2_dp2_layout():
    topo = Topology(pp=2, tp=2, dp=2)
    assert topo.tp_ranks(5) == [4, 5] and topo.dp_ranks(5) == [5, 7] and topo.pp_ranks(5) == [1, 5]
    assert [topo.reads_data(r) for r in range(8)] == [True] * 8  # two stages: each is first or last
    middle = Topology(pp=4, tp=2, dp=1)
    assert [r for r in range(8) if middle.reads_data(r)] == [0, 1, 6, 7]


def test_world_size_mismatch_names_the_fix():
    cfg = resolve({}, ["parallel.pp=2", "parallel.tp=2", "model.n_kv_head=2"])
    with pytest.raises(ConfigError, match=r"2 \* 2 \* 1 = 4 ranks, but 3 were started"):
        Topology.from_config(cfg.parallel, world_size=3)


def test_check_layout_rejects_indivisible_heads():
    cfg = resolve({}, ["model.n_head=4"])
    with pytest.raises(ConfigError, match=r"n_head=4 is not divisible by parallel.tp=3"):
        Topology(pp=1, tp=3, dp=1).check_model(
            cfg.model, cfg.data.vocab_size, zero_stage=0, seq_len=cfg.data.seq_len
        )
    with pytest.raises(ConfigError, match="lower parallel.pp or add layers"):
        Topology(pp=5, tp=1, dp=1).check_model(
            cfg.model, cfg.data.vocab_size, zero_stage=0, seq_len=cfg.data.seq_len
        )


def test_sequence_parallel_needs_tp_that_divides_the_window():
    """One line with the fix, at config time; a valid one reaches the Topology the engine builds."""
    with pytest.raises(ConfigError) as caught:
        resolve({}, ["parallel.sequence_parallel=true"])
    assert "\n" not in str(caught.value) and "needs parallel.tp > 1" in str(caught.value)
    assert "set parallel.tp to 2 or more, or parallel.sequence_parallel=false" in str(caught.value)
    with pytest.raises(
        ConfigError, match=r"data.seq_len=63 is not divisible by parallel.tp=2.*multiple of 2"
    ):
        resolve({}, ["parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_len=63"])
    cfg = resolve({}, ["parallel.sequence_parallel=true", "parallel.tp=2", "model.n_kv_head=2"])
    assert Topology.from_config(cfg.parallel).sequence_parallel
    with pytest.raises(ConfigError, match="not supported yet .* set one of them to false"):
        resolve({}, ["parallel.sequence_parallel=true", "parallel.tp=2", "data.document_mask=true"])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_need_pp_1(stage):
    """One line, at config time; with pp = 1 the plain engine takes every stage."""
    with pytest.raises(ConfigError) as caught:
        resolve({}, ["parallel.pp=2", f"parallel.zero_stage={stage}"])
    message = str(caught.value)
    assert "\n" not in message and f"parallel.zero_stage={stage} with parallel.pp=2" in message
    assert "set parallel.zero_stage=1 (or parallel.pp=1)" in message
    assert resolve({}, ["parallel.pp=1", "parallel.tp=2", "parallel.dp=2", f"parallel.zero_stage={stage}"])


def test_ds_config_from_typed_config():
    cfg = resolve(
        {},
        [
            "parallel.pp=2",
            "parallel.dp=2",
            "parallel.micro_batch=2",
            "train.global_batch=16",
            "parallel.zero_stage=1",
            "train.precision=bf16",
            "parallel.activation_checkpointing=true",
        ],
    )
    ds = build_ds_config(cfg.parallel, TrainSpec.from_config(cfg))
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 1
    assert ds["pipeline"]["activation_checkpoint_interval"] == 1
    assert build_ds_config(cfg.parallel, TrainSpec.from_config(cfg), micro_batches=2)["train_batch_size"] == 8


def test_ds_config_keeps_the_zero_stage_and_drops_the_pipeline_at_pp1():
    cfg = resolve({}, ["parallel.pp=1", "parallel.dp=2", "parallel.zero_stage=3"])
    ds = build_ds_config(cfg.parallel, TrainSpec.from_config(cfg))
    assert ds["zero_optimization"]["stage"] == 3 and "pipeline" not in ds
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] < 5e8  # not DeepSpeed's default, a second model's worth
    # gathered layers are released after use, and the optimizer steps bounded sub-groups, not the whole partition
    assert zero["stage3_max_reuse_distance"] == 0 and zero["sub_group_size"] < 1e9


def test_grad_comm_dtype_sets_the_reduction_dtype_only_when_asked():
    """auto leaves DeepSpeed's default (the compute dtype); fp32 and bf16 are passed on as its key."""
    for value, want in (("auto", None), ("bf16", "bf16"), ("fp32", "fp32")):
        cfg = resolve({}, ["parallel.dp=2", f"parallel.grad_comm_dtype={value}"])
        assert (
            build_ds_config(cfg.parallel, TrainSpec.from_config(cfg)).get("communication_data_type") == want
        )


@pytest.mark.parametrize(
    "layout", [("parallel.pp=2",), ("parallel.pp=1",), ("parallel.pp=1", "parallel.tp=2")]
)
def test_fp32_over_one_dp_rank_runs_without_zero(layout):
    """ZeRO over a single DP rank partitions nothing and only adds DeepSpeed's flat copies: it runs ZeRO 0."""
    cfg = resolve({}, [*layout, "parallel.dp=1", "parallel.zero_stage=1"])
    assert build_ds_config(cfg.parallel, TrainSpec.from_config(cfg))["zero_optimization"]["stage"] == 0
    bf16 = resolve({}, ["parallel.pp=1", "parallel.zero_stage=0", "train.precision=bf16"])
    assert build_ds_config(bf16.parallel, TrainSpec.from_config(bf16))["zero_optimization"]["stage"] == 1


def test_world_size_is_one_product():
    from raylm.config.layout import num_workers

    cfg = resolve(
        {}, ["parallel.pp=2", "parallel.tp=2", "parallel.dp=3", "model.n_kv_head=2", "train.global_batch=24"]
    )
    assert num_workers(cfg) == Topology.from_config(cfg.parallel).world_size == 12


def test_compute_partition_keeps_the_head_off_the_busiest_stage():
    """Balancing FLOPs gives the stage with the head one block fewer: the embedding lookup costs nothing."""
    from deepspeed.runtime.utils import partition_balanced

    from raylm.model.facts import layer_costs

    cfg = resolve(
        {
            "model": {"d_model": 256, "n_layer": 7, "n_head": 8, "max_seq_len": 256},
            "data": {"seq_len": 256, "vocab_size": 2048},
        }
    )
    costs = layer_costs(cfg.model, 2048, 256)
    block, head = costs[1], costs[-1]
    assert costs[0] == costs[-2] == 0 and head == 6 * 2048 * 256 and 0 < head < block
    assert list(partition_balanced(costs, 2)) == [0, 5, 10]  # [embed, 4 blocks] | [3 blocks, norm, head]
    stage_cost = [sum(costs[a:b]) for a, b in zip([0, 5], [5, 10], strict=True)]
    assert max(stage_cost) == 4 * block


FREE_LOWERS_RSS = """
import ctypes, ctypes.util, sys
from raylm.parallel.host_alloc import map_large_allocations
fixed = sys.argv[1] == "fixed" and map_large_allocations()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
size = 8 << 20  # under glibc's dynamic ceiling (32 MiB)
for _ in range(2):  # the first free raises glibc's own threshold above 8 MiB; the second buffer is what counts
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    before = rss_kib()
    libc.free(pointer)
print(before - rss_kib() >= (size >> 10) * 3 // 4)
"""


@pytest.mark.parametrize("mode", ["fixed", "default"])
def test_map_large_allocations_returns_freed_buffers_to_the_system(mode):
    """With the threshold fixed, freeing a large buffer lowers resident memory at once; with glibc's default
    (the control) the heap keeps it. A fresh process each, so no other test runs under the changed allocator."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    out = subprocess.run(
        [sys.executable, "-c", FREE_LOWERS_RSS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.stdout.strip() == str(mode == "fixed")
