"""`raylm plan`: check the hardware flags, plan every layout, and return the lines the CLI prints."""

from __future__ import annotations

import json
import shlex

from raylm.config.layout import Layout
from raylm.config.schema import Config
from raylm.errors import ConfigError
from raylm.plan.calibrate import cpu_hardware
from raylm.plan.decide import describe
from raylm.plan.hardware import KINDS, Hardware, gpu_hardware
from raylm.plan.predict import plan
from raylm.plan.report import as_json, table

DEFAULT_GPUS_PER_NODE = 8


def hardware_for(gpu: str, gpu_mem_gb: float = 0.0, recalibrate: bool = False) -> Hardware:
    """The --gpu kind's hardware (cpu: this machine's calibration), with --gpu-mem applied."""
    if gpu_mem_gb < 0:
        raise ConfigError(f"--gpu-mem {gpu_mem_gb:g} must be positive GB; e.g. --gpu-mem 80")
    if gpu not in KINDS:
        raise ConfigError(f"--gpu {gpu!r} is not one of {', '.join(KINDS)}; e.g. --gpu h100")
    if gpu == "cpu":
        hw = cpu_hardware(recalibrate)
        return hw.with_mem_gb(gpu_mem_gb) if gpu_mem_gb else hw
    return gpu_hardware(gpu, gpu_mem_gb)


def node_shape(cfg: Config, gpus: int, gpus_per_node: int, gpu: str) -> tuple[int, int]:
    """(ranks, ranks per node) from the flags: ranks default to the config's pp*tp*dp, a node to 8 GPUs (cpu:
    every rank on this machine); a job of several nodes fills each one."""
    gpus = gpus or Layout.of(cfg.parallel).world_size
    if gpus <= 0:
        raise ConfigError(f"--gpus {gpus} must be positive; e.g. --gpus 8")
    per_node = gpus_per_node or (gpus if gpu == "cpu" else min(gpus, DEFAULT_GPUS_PER_NODE))
    if per_node <= 0:
        raise ConfigError(f"--gpus-per-node {per_node} must be positive; e.g. --gpus-per-node 8")
    if gpus > per_node and gpus % per_node:
        raise ConfigError(
            f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {per_node}; use a multiple of "
            f"{per_node}, e.g. --gpus {gpus // per_node * per_node or per_node}"
        )
    return gpus, per_node


def plan_command(
    cfg: Config,
    config_path: str,
    gpus: int = 0,
    gpus_per_node: int = 0,
    gpu: str = "h100",
    gpu_mem_gb: float = 0.0,
    json_lines: bool = False,
    top: int = 15,
    recalibrate: bool = False,
) -> list[str]:
    """The lines `raylm plan` prints: one JSON object per layout, or the table and the best layout."""
    if top <= 0:
        raise ConfigError(f"--top {top} must be positive; e.g. --top 15")
    hw = hardware_for(gpu, gpu_mem_gb, recalibrate)
    world, per_node = node_shape(cfg, gpus, gpus_per_node, gpu)
    ranked = plan(cfg, hw, world, per_node)
    if json_lines:
        return [json.dumps(as_json(p)) for p in ranked]
    head = (
        f"{len(ranked)} layouts of {cfg.model.n_layer} x d={cfg.model.d_model} (seq {cfg.data.seq_len}, "
        f"global batch {cfg.train.global_batch}, {cfg.train.precision}) on {world} {gpu} ranks, {per_node} per "
        f"node, {hw.mem_bytes / 1e9:.0f} GB each"
    )
    lines = [head, *table(ranked, top)]
    if ranked and ranked[0].fits:
        best = ranked[0]
        lines.append(f"best: {describe(best)}")
        lines.append(f"raylm train {shlex.quote(config_path)} {' '.join(best.overrides())}")
    else:
        lines.append("no layout fits: add GPUs (--gpus), or lower parallel.micro_batch or data.seq_len")
    return lines
