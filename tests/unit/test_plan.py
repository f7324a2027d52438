"""raylm plan: the bubble, invalid layouts left out with their reason, the 1F1B in-flight micro-batches, the CLI's
speed, its JSON keys and its one-line errors."""

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
    assert pred.time.bubble_s == pytest.approx((pp - 1) * slot)


def test_each_tp_all_reduce_waits_the_calibrated_sync_and_no_tp_pays_none():
    """A CPU's sync wait (calibrate._sync_wait_s) adds to every TP all-reduce of the step, and only to those."""
    import dataclasses

    hw = gpu_hardware("h100")
    slow = dataclasses.replace(hw, sync_wait_s=1e-3)
    tp2, tp2_slow = (predict(with_layout(gpt2(), 1, 2, 4, 1, 8, False), h, 8).time for h in (hw, slow))
    tp1, tp1_slow = (predict(with_layout(gpt2(), 1, 1, 8, 1, 8, False), h, 8).time for h in (hw, slow))
    assert tp2 is not None and tp2_slow is not None and tp1 is not None and tp1_slow is not None
    blocks, m = 12, 512 // (8 * 4)
    allreduces = m * (4 * blocks + 2)  # four per block, the embedding's and the loss's
    assert tp2_slow.tp_s - tp2.tp_s == pytest.approx(allreduces * 1e-3)
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
