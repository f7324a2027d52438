"""Decisions from the planner: Young/Daly's checkpoint interval, parallel.layout=auto, the preflight's refusal,
and the config keys behind them."""

import json
import math

import pytest

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.plan.calibrate import machine_key
from raylm.plan.decide import best_layout, check_fits, checkpoint_interval, young_daly_s
from raylm.plan.hardware import gpu_hardware
from raylm.plan.predict import plan, with_layout
from raylm.train.checkpointing import CheckpointManager
from raylm.train.planning import ClusterShape, choose_layout, preflight
from tests.conftest import TINY_CONFIG

GPT2_SMALL = TINY_CONFIG.parent / "gpt2-small.yaml"
H100_NODE = ClusterShape(gpus=8, gpus_per_node=8, gpu_kind="h100", accelerator="H100")


def test_young_daly_is_the_square_root_of_twice_save_time_times_mtbf():
    assert young_daly_s(60.0, 86_400.0) == pytest.approx(math.sqrt(2 * 60 * 86_400))
    # 100 nodes of 1000 h each fail once every 10 h; saves of 10 s, steps of 2 s
    got = checkpoint_interval(save_s=10.0, step_s=2.0, node_mtbf_h=1000.0, nodes=100)
    assert got.mtbf_s == pytest.approx(36_000.0)
    assert got.steps == round(math.sqrt(2 * 10 * 36_000) / 2)
    assert got.save_frac == pytest.approx(10 / (got.interval_s + 10))
    assert got.rework_frac == pytest.approx((got.interval_s + 10) / 2 / 36_000)
    assert checkpoint_interval(save_s=0.0, step_s=5.0, node_mtbf_h=1.0, nodes=1).steps == 1


def test_a_background_save_sets_the_interval_by_its_snapshot_but_never_below_its_whole_time():
    # a 0.5 s snapshot, steps of 2 s, one node of 1 h MTBF: Young/Daly says sqrt(2 x 0.5 x 3600) = 60 s = 30 steps
    for min_interval_s, steps in [(0.0, 30), (41.0, 30), (100.0, 50), (101.0, 51)]:
        got = checkpoint_interval(0.5, 2.0, node_mtbf_h=1.0, nodes=1, min_interval_s=min_interval_s)
        assert got.steps == steps, min_interval_s


def test_young_daly_interval_loses_less_than_half_or_twice_it():
    best = checkpoint_interval(save_s=30.0, step_s=1.0, node_mtbf_h=5000.0, nodes=128)
    for factor in (0.5, 2.0):
        other = type(best)(best.steps, best.interval_s * factor, 30.0, best.step_s, best.mtbf_s)
        assert other.goodput < best.goodput


def test_every_steps_auto_is_checkpoint_interval_auto_and_conflicts_are_refused():
    cfg = load_config(TINY_CONFIG, ["checkpoint.every_steps=auto"])
    assert cfg.checkpoint.interval == "auto" and cfg.checkpoint.every_steps == 0
    with pytest.raises(ConfigError, match="checkpoint.every_steps=auto and checkpoint.interval='steps'"):
        load_config(TINY_CONFIG, ["checkpoint.every_steps=auto", "checkpoint.interval=steps"])
    with pytest.raises(ConfigError, match="checkpoint.every_steps=100 with checkpoint.interval=auto"):
        load_config(TINY_CONFIG, ["checkpoint.interval=auto"])
    with pytest.raises(ConfigError, match="fault.mtbf_hours=0.0 must be positive"):
        load_config(TINY_CONFIG, ["fault.mtbf_hours=0"])
    with pytest.raises(
        ConfigError, match=r"parallel.layout=auto picks one fixed layout, but parallel.dp=\[1, 2\]"
    ):
        load_config(TINY_CONFIG, ["parallel.layout=auto", "parallel.dp=[1, 2]"])


def test_an_auto_interval_saves_at_the_first_step_then_every_young_daly_steps():
    cfg = load_config(TINY_CONFIG, ["checkpoint.every_steps=auto", "train.max_steps=50"])
    manager = CheckpointManager(cfg, engine=None, run_dir=None, rank=0)  # due() reads no engine or folder
    assert manager.due(1) and manager.due(2)  # until the first save has been timed
    manager.interval = checkpoint_interval(save_s=1.0, step_s=1.0, node_mtbf_h=8 / 3600, nodes=1)
    manager.every = manager.interval.steps  # sqrt(2 x 1 s x 8 s) = 4 steps
    assert [s for s in range(1, 51) if manager.due(s)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 50]


def test_best_layout_is_the_fastest_that_fits_and_none_fitting_is_one_line():
    cfg = load_config(GPT2_SMALL)
    hw = gpu_hardware("h100")
    best = best_layout(cfg, hw, 8, 8)
    fitting = [p for p in plan(cfg, hw, 8, 8) if p.fits]
    assert best.tokens_per_s == max(p.tokens_per_s for p in fitting)
    with pytest.raises(ConfigError, match="no layout of 12-layer d=768 fits 8 ranks of 1 GB"):
        best_layout(cfg, gpu_hardware("h100", mem_gb=1), 8, 8)


def test_preflight_refuses_a_predicted_oom_naming_the_figure_and_a_layout_that_fits():
    cfg = with_layout(load_config(GPT2_SMALL), 1, 1, 8, 1, 64 // 8, False)
    hw = gpu_hardware("h100", mem_gb=8)
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, hw, 8)
    message = str(err.value)
    assert message.startswith("predicted ") and " GB per rank of 8.0 (weights " in message
    assert "fits (" in message and "--force runs it anyway" in message
    assert "\n" not in message
    ok = with_layout(cfg, 1, 1, 8, 1, 1, True)
    assert check_fits(ok, hw, 8).fits


def test_preflight_on_a_table_gpu_and_on_an_unknown_one():
    big = with_layout(
        load_config(GPT2_SMALL, ["model.n_layer=96", "model.d_model=6144", "model.n_head=48"]),
        1,
        1,
        8,
        0,
        8,
        False,
    )
    with pytest.raises(ConfigError, match="predicted .* GB per rank of 80.0"):
        preflight(big, H100_NODE)
    unknown = ClusterShape(gpus=8, gpus_per_node=8, gpu_kind=None, accelerator="L40S")
    assert preflight(big, unknown) is None


def test_layout_auto_takes_the_best_layout_for_the_clusters_gpus():
    cfg = load_config(GPT2_SMALL, ["parallel.layout=auto"])
    chosen, best = choose_layout(cfg, H100_NODE)
    p = chosen.parallel
    assert (p.pp, p.tp, p.dp, p.zero_stage, p.micro_batch) == (
        best.pp,
        best.tp,
        best.dp,
        best.zero_stage,
        best.micro_batch,
    )
    assert p.pp * p.tp * p.dp == 8 and p.layout == "auto"
    assert best.tokens_per_s == best_layout(cfg, gpu_hardware("h100"), 8, 8).tokens_per_s


def test_layout_auto_on_cpu_needs_the_worker_count_and_uses_the_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    figures = {
        "key": machine_key(),
        "matmul_fp32": 100e9,
        "matmul_bf16": 200e9,
        "mem_bw": 20e9,
        "ram_bytes": 16e9,
        "allreduce_bw": 1e9,
        "send_bw": 2e9,
        "latency_s": 1e-4,
        "sync_wait_s": 1e-3,
        "idle_rank_bytes": 0.9e9,
    }
    (tmp_path / "raylm").mkdir()
    (tmp_path / "raylm" / "cpu-calibration.json").write_text(json.dumps(figures))
    no_gpus = ClusterShape(gpus=0, gpus_per_node=0, gpu_kind=None, accelerator="")
    cfg = load_config(TINY_CONFIG, ["parallel.layout=auto"])
    with pytest.raises(ConfigError, match="needs the worker count; set parallel.num_workers=N"):
        choose_layout(cfg, no_gpus)
    # num_workers is the count to plan for: the degrees written beside it (tiny's pp=2) need not multiply to it
    chosen, best = choose_layout(
        load_config(TINY_CONFIG, ["parallel.layout=auto", "parallel.num_workers=4"]), no_gpus
    )
    assert chosen.parallel.pp * chosen.parallel.tp * chosen.parallel.dp == 4
    assert chosen.parallel.num_workers == 0 and best.fits and best.mem_limit == pytest.approx(16e9 / 4)


def test_a_calibration_of_another_machine_is_not_used_and_memory_checks_measure_nothing(
    tmp_path, monkeypatch
):
    from raylm.plan.calibrate import IDLE_RANK_BYTES, cache_path, cpu_memory_hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path() == tmp_path / "raylm" / "cpu-calibration.json"
    stale = {"key": {**machine_key(), "torch": "0.0"}, "idle_rank_bytes": 1.0}
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(json.dumps(stale))
    hw = cpu_memory_hardware()  # another torch wrote it: the defaults, and no measurement
    assert hw.framework_bytes == IDLE_RANK_BYTES and hw.mem_bytes > 0
    assert json.loads(cache_path().read_text()) == stale


def test_a_sweep_trial_refuses_layout_auto():
    with pytest.raises(ConfigError, match="parallel.layout=auto is for raylm train"):
        load_config(TINY_CONFIG, ["parallel.layout=auto", "tune.trial_of=s1"])
