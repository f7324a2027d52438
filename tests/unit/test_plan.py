"""raylm plan: the bubble and 1F1B's fill and drain, the TP collectives against what the TP layers run, invalid
layouts left out with their reason, the 1F1B in-flight micro-batches, the CLI's speed, its JSON keys and its
one-line errors."""

import dataclasses
import json
import resource
import subprocess
import sys
import time

import pytest

from raylm.config import load_config
from raylm.plan.hardware import gpu_hardware
from raylm.plan.predict import plan, predict, with_layout
from tests.conftest import TINY_CONFIG

GPT2_SMALL = str(TINY_CONFIG.parent / "gpt2-small.yaml")
JSON_KEYS = {
    "pp",
    "tp",
    "dp",
    "zero_stage",
    "micro_batch",
    "fits",
    "parameters",
    "params_gb",
    "grads_gb",
    "optimizer_gb",
    "activations_gb",
    "mem_per_rank_gb",
    "tokens_per_s",
    "mfu",
}


def gpt2(*overrides: str):
    return load_config(GPT2_SMALL, ["schedule.batch.start=0", *overrides])


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (8, 32), (4, 1)])
def test_bubble_is_p_minus_1_over_m_plus_p_minus_1(pp, m):
    cfg = with_layout(gpt2(), pp, 1, 1, 1, 512 // m, False)
    pred = predict(cfg, gpu_hardware("h100"), 8)
    assert pred.time is not None
    assert pred.micro_batches == m
    assert pred.time.bubble == pytest.approx((pp - 1) / (m + pp - 1))
    slot = (pred.time.compute_s + pred.time.tp_s + pred.time.p2p_s) / m
    # the fill and drain are the other stages' slots: at most p - 1 of the slowest's (gpt2-small's
    # 50k-vocabulary head makes the last stage the slowest, by far at pp = 8)
    assert 0 < pred.time.bubble_s <= (pp - 1) * slot * (1 + 1e-9)


def test_fill_and_drain_are_one_slot_of_each_other_stage():
    """1F1B's critical path: the slowest stage's m micro-batches and one of every other stage's, so a pipeline
    whose last stage also holds the head waits less than (p - 1) of the last stage's slots."""
    from raylm.plan.memory import RankSetup
    from raylm.plan.stages import model_shape, stages
    from raylm.plan.timing import Placement, micro_batch_slot_s, step_time

    hw = gpu_hardware("h100")
    shape = model_shape(gpt2(), 1)
    setup = RankSetup(
        pp=4, tp=1, dp=1, zero_stage=0, micro_batch=8, micro_batches=8, checkpointing=False, precision="bf16"
    )
    parts = stages(shape, 4, "uniform")
    place = Placement(gpus_per_node=8, tp=1, dp=1, world=4)
    slots = [sum(micro_batch_slot_s(shape, s, setup, hw, place)) for s in parts]
    t = step_time(shape, parts, setup, hw, place, grad_e=2)
    assert t.compute_s + t.tp_s + t.p2p_s == pytest.approx(8 * max(slots))
    assert t.bubble_s == pytest.approx(sum(slots) - max(slots))
    assert t.bubble_s < 3 * max(slots)


def test_tp_collectives_count_what_the_tp_layers_run():
    """Without sequence parallelism a block all-reduces wo's and w2's outputs forward and the inputs' gradients of
    its five column-parallel layers backward; with it, 8 gathers and scatters (4 all-reduces' bytes) and the two
    norms' gain gradients. The loss adds two small all-reduces, each end stage one activation's."""
    from raylm.plan.memory import RankSetup
    from raylm.plan.stages import model_shape, stages
    from raylm.plan.timing import tp_collectives

    shape = model_shape(gpt2(), 2)
    whole = stages(shape, 1, "uniform")[0]
    setup = RankSetup(
        pp=1, tp=2, dp=1, zero_stage=0, micro_batch=8, micro_batches=8, checkpointing=False, precision="bf16"
    )
    assert tp_collectives(whole, setup) == (12 * 7 + 2, 2, 12 * 7 + 2 + 2)
    sp = dataclasses.replace(setup, sequence_parallel=True)
    assert tp_collectives(whole, sp) == (12 * 4 + 2, 12 * 2 + 2 + 1, 12 * 8 + 4 + 12 * 2 + 2 + 1)
    ckpt = dataclasses.replace(setup, checkpointing=True)
    assert tp_collectives(whole, ckpt)[0] == 12 * 9 + 2


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of this process alone: the TP layers' collectives run (over one rank, an identity)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_a_tp_block_runs_the_all_reduces_the_planner_counts(one_rank_group, monkeypatch):
    """A block with its linears split for tp = 2 all-reduces (B, T, C) activations TP_ALLREDUCES_PER_BLOCK times
    over its forward and backward (the collectives themselves run; the test counts them)."""
    import torch
    import torch.distributed as dist

    from raylm.parallel.layers import BlockPipe
    from raylm.parallel.tensor import TPGroup
    from raylm.plan.timing import TP_ALLREDUCES_PER_BLOCK

    cfg = load_config(TINY_CONFIG, ["model.d_model=64", "model.n_head=4"])
    block = BlockPipe(cfg.model, 0, TPGroup(one_rank_group, rank=0, size=2))
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    shapes = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda x, **kw: shapes.append(tuple(x.shape)) or all_reduce(x, **kw)
    )
    x = torch.randn(2, 16, 64, requires_grad=True)
    block(x).sum().backward()
    assert shapes == [(2, 16, 64)] * TP_ALLREDUCES_PER_BLOCK


def test_each_tp_collective_waits_the_calibrated_sync_and_no_tp_pays_none():
    """A CPU's sync wait (calibrate._sync_wait_s) adds to every TP collective of the step, and only to those."""
    hw = gpu_hardware("h100")
    slow = dataclasses.replace(hw, sync_wait_s=1e-3)
    tp2, tp2_slow = (predict(with_layout(gpt2(), 1, 2, 4, 1, 8, False), h, 8).time for h in (hw, slow))
    tp1, tp1_slow = (predict(with_layout(gpt2(), 1, 1, 8, 1, 8, False), h, 8).time for h in (hw, slow))
    assert tp2 is not None and tp2_slow is not None and tp1 is not None and tp1_slow is not None
    blocks, m = 12, 512 // (8 * 4)
    collectives = m * (7 * blocks + 2 + 2)  # seven per block, the embedding's, the head's and the loss's two
    assert tp2_slow.tp_s - tp2.tp_s == pytest.approx(collectives * 1e-3)
    assert tp1.tp_s == tp1_slow.tp_s == 0


def test_invalid_layouts_are_left_out_with_the_config_checks_reason():
    ranked = plan(gpt2(), gpu_hardware("h100"), 8, 8)
    refused = {(p.pp, p.tp, p.dp, p.zero_stage): p.why for p in ranked if not p.valid}
    assert any("model.n_head=12 is not divisible by parallel.tp=8" in why for why in refused.values())
    assert "supports ZeRO 0 or 1 only" in refused[(2, 1, 4, 2)]
    assert not any(p.tp == 8 for p in ranked if p.valid)
    assert all(p.valid for p in ranked if p.fits)
    assert ranked[0].fits and ranked[0].tokens_per_s == max(p.tokens_per_s for p in ranked if p.fits)


def test_the_first_stage_holds_the_most_micro_batches_in_flight():
    cfg = with_layout(gpt2(), 4, 1, 2, 1, 4, False)  # m = 512 / (4 * 2) = 64 micro-batches, p = 4 in flight
    from raylm.plan.memory import RankSetup, stage_activation_bytes
    from raylm.plan.stages import model_shape, stages

    shape = model_shape(cfg, 1)
    setup = RankSetup(
        pp=4, tp=1, dp=2, zero_stage=1, micro_batch=4, micro_batches=64, checkpointing=False, precision="bf16"
    )
    parts = stages(shape, 4, "uniform")
    acts = [stage_activation_bytes(shape, s, setup) for s in parts[:-1]]  # the last also holds logits
    per_mb = [a / (4 - s.index) for a, s in zip(acts, parts, strict=False)]
    assert acts[0] > acts[1] > acts[2]
    assert per_mb[0] == pytest.approx(per_mb[1], rel=0.35)  # the same blocks per stage, more in flight


def test_checkpointing_and_zero_lower_the_prediction_and_a_small_gpu_refuses():
    hw = gpu_hardware("h100")
    plain = predict(with_layout(gpt2(), 1, 1, 8, 1, 8, False), hw, 8)
    ckpt = predict(with_layout(gpt2(), 1, 1, 8, 1, 8, True), hw, 8)
    zero3 = predict(with_layout(gpt2(), 1, 1, 8, 3, 8, False), hw, 8)
    assert plain.memory and ckpt.memory and zero3.memory
    assert ckpt.memory.activations < 0.65 * plain.memory.activations  # the logits' softmax stays
    assert ckpt.time and plain.time and ckpt.time.compute_s > plain.time.compute_s
    assert zero3.memory.params < plain.memory.params
    small = predict(with_layout(gpt2(), 1, 1, 8, 1, 8, False), gpu_hardware("h100", mem_gb=4), 8)
    assert not small.fits and small.why.startswith("predicted ") and "of 4.0 GB" in small.why


def test_sequence_parallelism_splits_the_kept_block_inputs_and_the_pipeline_sends():
    """With checkpointing a block keeps its input, which sequence parallelism splits over tp; at pp = 2 each TP
    rank sends its sequence shard. The layouts with tp = 1 are out with the layout rule's reason."""
    hw = gpu_hardware("h100")
    layout = (2, 2, 2, 1, 8, True)
    plain = predict(with_layout(gpt2(), *layout), hw, 8)
    split = predict(with_layout(gpt2("parallel.sequence_parallel=true"), *layout), hw, 8)
    assert plain.memory and split.memory and plain.time and split.time
    # the fullest rank is the last stage (4 blocks, one micro-batch in flight): its kept block inputs halve,
    # the recomputed block and the 50k-vocab logits stay
    assert split.memory.stage == plain.memory.stage == 1
    kept_inputs = 4 * 8 * 1024 * 768 * 2  # blocks x tokens x d x bf16 bytes
    assert plain.memory.activations - split.memory.activations >= kept_inputs / 2
    assert (split.memory.params, split.memory.optimizer) == (plain.memory.params, plain.memory.optimizer)
    assert split.time.p2p_s < plain.time.p2p_s
    tp1 = predict(with_layout(gpt2("parallel.sequence_parallel=true"), 1, 1, 8, 1, 8, False), hw, 8)
    assert tp1.memory is None and "parallel.sequence_parallel=true needs parallel.tp > 1" in tp1.why


def test_document_masks_add_each_blocks_mask_unless_checkpointing_drops_it():
    """data.document_mask: each of the 12 blocks keeps its (B, 1, T, T) mask in bf16 and its RoPE tables (fp32
    cos and sin, 64 wide each: 4 x 64 bytes per token), and the running block's boolean mask lives beside them;
    under activation checkpointing only the block being recomputed holds a mask."""
    hw = gpu_hardware("h100")
    tokens, T = 8 * 1024, 1024  # micro_batch 8 of gpt2-small's 1024
    block = tokens * (2 * T + 4 * 64)
    for checkpointing, blocks in ((False, 12), (True, 1)):
        layout = (1, 1, 8, 1, 8, checkpointing)
        plain = predict(with_layout(gpt2(), *layout), hw, 8)
        masked = predict(with_layout(gpt2("data.document_mask=true"), *layout), hw, 8)
        assert plain.memory and masked.memory
        extra = masked.memory.activations - plain.memory.activations
        assert extra == pytest.approx(blocks * block + tokens * T)


def test_context_parallelism_divides_a_ranks_activations_and_costs_all_to_alls():
    """cp = 2 at seq 8192: a rank keeps about half of cp = 1's activations (plus the attention output Ulysses
    keeps on both sides of its all-to-all), ZeRO-1 partitions over dp x cp, and the all-to-alls take time;
    pp = 2 is out with the rule's reason."""
    hw, long = gpu_hardware("h100"), ("data.seq_len=8192", "model.max_seq_len=8192")
    one = predict(with_layout(gpt2(*long), 1, 1, 8, 1, 1, False), hw, 8)
    two = predict(with_layout(gpt2(*long), 1, 1, 4, 1, 1, False, cp=2), hw, 8)
    assert one.memory and two.memory and one.time and two.time
    assert 0.5 < two.memory.activations / one.memory.activations < 0.6
    assert two.memory.optimizer == pytest.approx(one.memory.optimizer)  # 8 ranks either way
    assert one.time.cp_s == 0 < two.time.cp_s
    piped = predict(with_layout(gpt2(*long), 2, 1, 2, 1, 1, False, cp=2), hw, 8)
    assert piped.memory is None and "no sequence axis" in piped.why


def raylm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args], capture_output=True, text=True, timeout=60
    )


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_raylm_plan_gpt2_small_on_8_h100_answers_within_5_s_with_every_key():
    # the command's own CPU seconds (its wall time on an idle machine): a loaded test machine stretches the wall
    # clock, not the work; the wall clock still gets a loose bound
    start, cpu_before = time.perf_counter(), children_cpu_s()
    proc = raylm("plan", GPT2_SMALL, "--gpus", "8", "--gpus-per-node", "8", "--gpu", "h100", "--json")
    elapsed, cpu_s = time.perf_counter() - start, children_cpu_s() - cpu_before
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert cpu_s < 5.0 and elapsed < 30.0
    fitting = [r for r in rows if r["fits"]]
    assert fitting and set(fitting[0]) >= JSON_KEYS
    assert all(r["pp"] * r["cp"] * r["tp"] * r["dp"] == 8 for r in rows)
    assert any(
        r["cp"] > 1 and r["fits"] for r in rows
    )  # Ulysses layouts are listed (gpt2-small: 12 KV heads)
    assert all(r["why"] for r in rows if not r["fits"])
    table = raylm("plan", GPT2_SMALL, "--gpus", "8", "--gpu", "h100")
    assert table.returncode == 0 and "raylm train" in table.stdout and "parallel.pp=" in table.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "tpu"], "--gpu 'tpu' is not one of h100, h200, a100, cpu; e.g. --gpu h100"),
        (["--gpus", "12"], "--gpus 12 is not a whole number of nodes of --gpus-per-node 8"),
        (["parallel.tp=5", "--gpus", "8"], "model.n_head=12 is not divisible"),
        (["--gpu-mem", "-1"], "--gpu-mem -1 must be positive GB"),
    ],
)
def test_bad_input_is_one_line_naming_the_value_and_no_traceback(args, message):
    proc = raylm("plan", GPT2_SMALL, *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("raylm: error: ")
    assert "Traceback" not in proc.stderr
