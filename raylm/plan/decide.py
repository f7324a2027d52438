"""Decisions from the predictions: the layout `parallel.layout=auto` takes, the preflight's refusal of a layout
predicted not to fit, and the checkpoint interval `checkpoint.every_steps=auto` takes (Young/Daly)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raylm.config.layout import Layout
from raylm.config.schema import Config
from raylm.errors import ConfigError
from raylm.plan.hardware import Hardware
from raylm.plan.predict import GB, Prediction, plan, predict

HOUR_S = 3600.0
CHECKPOINT_BYTES_PER_PARAM = (
    12  # fp32 weights and two fp32 AdamW moments: what a checkpoint's layer files hold
)


def best_layout(cfg: Config, hw: Hardware, world: int, gpus_per_node: int) -> Prediction:
    """The fitting layout with the most predicted tokens/s on `world` ranks; ConfigError when none fits."""
    ranked = plan(cfg, hw, world, gpus_per_node)
    if not ranked or not ranked[0].fits:
        closest = next((p for p in ranked if p.valid), None)
        why = f"; the smallest is {closest.why}" if closest else ""
        raise ConfigError(
            f"no layout of {cfg.model.n_layer}-layer d={cfg.model.d_model} fits {world} ranks of "
            f"{hw.mem_bytes / GB:.0f} GB{why}; add ranks, lower parallel.micro_batch or data.seq_len"
        )
    return ranked[0]


def describe(pred: Prediction) -> str:
    """One line: the layout and its prediction, for logs."""
    assert pred.memory is not None and pred.time is not None
    return (
        f"pp={pred.pp} cp={pred.cp} tp={pred.tp} dp={pred.dp} zero_stage={pred.zero_stage} "
        f"micro_batch={pred.micro_batch} "
        f"activation_checkpointing={str(pred.activation_checkpointing).lower()}: predicted "
        f"{pred.memory.total / GB:.2f} GB per rank, step {pred.time.total:.3g} s, "
        f"{pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%}, bubble {pred.time.bubble:.1%}"
    )


def check_fits(
    cfg: Config, hw: Hardware, gpus_per_node: int, command: str = "raylm plan CONFIG"
) -> Prediction:
    """The config's own layout's prediction; ConfigError naming the figure and a layout that fits when it is
    predicted not to fit (the caller skips this under --force)."""
    pred = predict(cfg, hw, gpus_per_node)
    if pred.fits or not pred.valid:
        return pred
    assert pred.memory is not None
    world = Layout.of(cfg.parallel).world_size
    ranked = plan(cfg, hw, world, gpus_per_node)
    fix = "no layout of these ranks fits: add ranks or lower parallel.micro_batch"
    if ranked and ranked[0].fits:
        changed = [o for o, mine in zip(ranked[0].overrides(), pred.overrides(), strict=True) if o != mine]
        fix = f"{' '.join(changed)} fits ({ranked[0].memory.total / GB:.1f} GB)" if ranked[0].memory else fix
    raise ConfigError(
        f"predicted {pred.memory.total / GB:.1f} GB per rank of {pred.mem_limit / GB:.1f} "
        f"(weights {pred.memory.params / GB:.1f}, gradients {pred.memory.grads / GB:.1f}, optimizer "
        f"{pred.memory.optimizer / GB:.1f}, activations {pred.memory.activations / GB:.1f}); {fix}; "
        f"`{command} --gpus {world}` shows all, --force runs it anyway"
    )


@dataclass(frozen=True)
class CheckpointInterval:
    """Young/Daly's checkpoint interval and what it costs: the share of time spent saving and the expected share
    redone after failures (half an interval per failure)."""

    steps: int
    interval_s: float  # steps x step_s
    save_s: float
    step_s: float
    mtbf_s: float  # the whole job's: one node's MTBF / nodes
    restart_s: float = 0.0  # a failure's cost besides the redone steps: a new worker group and the load

    @property
    def save_frac(self) -> float:
        return self.save_s / (self.interval_s + self.save_s)

    @property
    def rework_frac(self) -> float:
        return (self.interval_s + self.save_s) / 2 / self.mtbf_s

    @property
    def restart_frac(self) -> float:
        return self.restart_s / self.mtbf_s

    @property
    def failures_per_day(self) -> float:
        return 86_400.0 / self.mtbf_s

    @property
    def goodput(self) -> float:
        """Share of wall time that trains steps that are kept."""
        return max(0.0, 1.0 - self.save_frac - self.rework_frac - self.restart_frac)

    def describe(self) -> str:
        return (
            f"every {self.steps} steps ({self.interval_s:.3g} s): save {self.save_s:.3g} s, step "
            f"{self.step_s:.3g} s, job MTBF {self.mtbf_s / HOUR_S:.3g} h; expected {self.save_frac:.2%} of the "
            f"time saving and {self.rework_frac:.2%} redone after failures"
        )


def young_daly_s(save_s: float, mtbf_s: float) -> float:
    """The optimal interval between checkpoints to first order: sqrt(2 x save time x MTBF)."""
    return math.sqrt(2 * save_s * mtbf_s)


def checkpoint_write_s(parameters: int, pp: int, writer_bw: float) -> tuple[float, float]:
    """(bytes, seconds) of one checkpoint: fp32 weights and AdamW's two moments per parameter, written by each
    stage's (dp 0, tp 0) rank in parallel (raylm.checkpoint.state), each at `writer_bw` bytes/s."""
    nbytes = CHECKPOINT_BYTES_PER_PARAM * parameters
    return nbytes, nbytes / pp / writer_bw


def checkpoint_interval(
    save_s: float,
    step_s: float,
    node_mtbf_h: float,
    nodes: int,
    restart_s: float = 0.0,
    min_interval_s: float = 0.0,
) -> CheckpointInterval:
    """Young/Daly's interval in whole steps (at least one) for a job of `nodes` nodes. `save_s` is the time a
    save stops training (a background save: only its snapshot); `min_interval_s` a floor (a background
    save's whole time: a save that starts before the previous one is done waits for it)."""
    if step_s <= 0 or node_mtbf_h <= 0 or nodes <= 0:
        raise ValueError(f"step_s={step_s}, node_mtbf_h={node_mtbf_h}, nodes={nodes} must be positive")
    mtbf_s = node_mtbf_h * HOUR_S / nodes
    steps = max(1, round(young_daly_s(max(save_s, 0.0), mtbf_s) / step_s), math.ceil(min_interval_s / step_s))
    return CheckpointInterval(
        steps=steps,
        interval_s=steps * step_s,
        save_s=save_s,
        step_s=step_s,
        mtbf_s=mtbf_s,
        restart_s=restart_s,
    )
