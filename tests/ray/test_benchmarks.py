"""Benchmarks' dry modes run end to end on CPU (the GPU one, the memory one), so the scripts do not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow  # a whole TorchTrainer run through the script (~25 s); make test trains on Ray elsewhere
def test_gpu_benchmark_dry_mode_prints_its_figures(ray_cluster):
    """On the session's Ray (RAY_ADDRESS), as on a cluster: the script's run is one more job there."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--dry"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        figures["dry"] is True
        and figures["steps"] == 4
        and (figures["pp"], figures["tp"], figures["dp"]) == (1, 1, 1)
    )
    assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1


def dry_run_lines(script: str, timeout_s: float) -> list[dict]:
    """The JSON lines `python benchmarks/SCRIPT --dry` prints (DeepSpeed prints other lines too)."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--dry"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]


def test_memory_benchmark_dry_mode_prints_its_figures():
    lines = dry_run_lines("memory.py", timeout_s=120)
    figures = {key: line for line in lines for key in line}
    assert (
        figures["idle_worker_rss_mb"]["dry"] is True
        and figures["idle_worker_rss_mb"]["idle_worker_rss_mb"] > 0
    )
    layout = figures["rss_vs_ideal"]
    assert (layout["pp"], layout["tp"], layout["dp"], layout["zero"]) == (1, 1, 1, 0) and layout[
        "rss_vs_ideal"
    ] > 0
    assert (
        figures["ckpt_write_bw_frac"]["ckpt_write_bw_frac"] > 0
        and figures["ckpt_read_bw_frac"]["ckpt_read_bw_frac"] > 0
    )


@pytest.mark.slow  # four tp = 2 engines in fresh ranks, stepped twice: 286 s measured on 2 shared cores
def test_sequence_parallel_benchmark_dry_mode_prints_its_figures():
    lines = dry_run_lines("sequence_parallel.py", timeout_s=900)
    steps = [line for line in lines if "step_mem_mb" in line]
    assert len(steps) == 4 and all(len(line["step_mem_mb"]) == 2 for line in steps)
    ratios = {key: line[key] for line in lines for key in line if key.startswith("sp_activation_ratio")}
    assert set(ratios) == {"sp_activation_ratio", "sp_activation_ratio_recompute"}
    assert all(0 < ratio < 2 for ratio in ratios.values()), ratios


@pytest.mark.slow  # six tp = 2 engines in fresh ranks, stepped at windows 128 to 1024: 49 s on 2 shared cores
def test_long_sequences_benchmark_dry_mode_prints_its_figures():
    lines = dry_run_lines("long_sequences.py", timeout_s=900)
    longest = [line for line in lines if "longest_seq_len" in line]
    assert len(longest) == 6 and all(line["longest_seq_len"] in (0, 128, 256, 512, 1024) for line in longest)
    steps = [line for line in lines if "step_mem_mb" in line]
    assert steps and all(len(line["step_mem_mb"]) == 2 for line in steps)
    ratios = [line for line in lines if "sp_step_mem_ratio" in line]
    assert len(ratios) == 2 and all(0 < line["sp_step_mem_ratio"] < 2 and line["dry"] for line in ratios)


@pytest.mark.slow  # a cp = 1 and a cp = 2 engine in fresh ranks, stepped twice each
def test_context_parallel_benchmark_dry_mode_prints_its_figures():
    lines = dry_run_lines("context_parallel.py", timeout_s=900)
    steps = [line for line in lines if "step_mem_mb" in line]
    assert [(line["cp"], len(line["step_mem_mb"])) for line in steps] == [(1, 1), (2, 2)]
    ratio = next(line["cp_activation_ratio"] for line in lines if "cp_activation_ratio" in line)
    assert 0 < ratio < 2, ratio
    assert {line["cp"] for line in lines if "longest_seq_len" in line} == {1, 2}
