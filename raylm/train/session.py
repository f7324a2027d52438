"""What one rank trains with: the parallel engine, its per-DP-rank streams, and the FLOP arithmetic for metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raylm.config import Config
from raylm.config.derived import eval_samples, samples_per_micro_step
from raylm.data.order import samples_sha
from raylm.log import get_logger
from raylm.model.facts import flops_per_token
from raylm.plan.peaks import gpu_peak_flops, measure_matmul_peak, mfu
from raylm.train.step import StepResult, TrainState, evaluate

if TYPE_CHECKING:
    from raylm.data.stream import RankStream
    from raylm.parallel.engine import Engine


@dataclass
class Session:
    """Engine + data for one rank. Ranks that do not read data (middle pipeline stages) get no streams."""

    cfg: Config
    engine: Engine
    reads_data: bool
    open_stream: Callable[..., RankStream] | None
    sample_order: Any  # the training split's global order (rank 0, which logs metrics); None elsewhere
    peak_flops: float | None  # all workers together; None = unknown (mfu is then null)

    @classmethod
    def build(cls, cfg: Config, backend: str, rank: int, workers_per_node: int = 1) -> Session:
        from raylm.data.stream import run_order
        from raylm.model.weights import starting_weights
        from raylm.parallel.ds_import import import_deepspeed

        import_deepspeed()
        from raylm.parallel.engine import build_engine, init_distributed

        # DeepSpeed needs its backend set before a PipelineModule is built; build_engine gives its groups the timeout
        init_distributed(backend, cfg.fault.collective_timeout_s)
        engine = build_engine(cfg, starting_weights(cfg))
        reads = engine.reads_data
        opener = _stream_opener(cfg, engine.coords.dp_rank, engine.topo.dp) if reads else None
        return cls(
            cfg=cfg,
            engine=engine,
            reads_data=reads,
            open_stream=opener,
            sample_order=run_order(cfg) if rank == 0 else None,
            peak_flops=_peak_flops(cfg, rank, engine.topo.world_size, workers_per_node),
        )

    def train_batches(self, start_sample: int, first_read_stall_s: float = 0.0) -> RankStream:
        """This DP rank's micro-batches of the training split from global sample `start_sample` on
        (first_read_stall_s: the read@STEP fault drill, raylm.train.faults)."""
        return self._opener()("train", start_sample, first_read_stall_s)

    def evaluate(self) -> float:
        """Validation loss on a fresh stream from the split's start: every evaluation sees the same samples, and
        the training stream does not move."""
        stream = self._opener()("val", 0) if self.reads_data else None
        try:
            return evaluate(self.engine, stream, self.eval_micro_batches, self.cfg.data.seq_len)
        finally:
            if stream is not None:
                stream.close()

    def _opener(self) -> Callable[..., RankStream]:
        assert self.open_stream is not None, "a rank that reads no data opens no stream"
        return self.open_stream

    @property
    def eval_micro_batches(self) -> int:
        return eval_samples(self.cfg) // samples_per_micro_step(self.cfg)

    def metrics_row(
        self, state: TrainState, result: StepResult, lr: float, global_batch: int, seq_len: int
    ) -> dict[str, Any]:
        """One metrics.jsonl row (keys listed in README.md "Where results land"); `step` is the 0-based step
        just finished, `seq_len` its window length (the attention FLOPs in mfu scale with it)."""
        tokens_per_s = global_batch * self.cfg.data.seq_len / result.step_s
        flops = flops_per_token(self.cfg.model, self.engine.vocab_size, seq_len)
        row: dict[str, Any] = {
            "step": state.step - 1,
            "tokens": state.tokens,
            "samples": state.samples,
            "loss": result.loss,
            "lr": lr,
            "batch_size": global_batch,
            "seq_len": seq_len,
            "dp": self.engine.topo.dp,
            "tokens_per_s": tokens_per_s,
            "step_s": result.step_s,
            "mfu": mfu(tokens_per_s, flops, self.peak_flops),
            "data_wait_frac": min(1.0, result.data_wait_s / result.step_s),
            "pipe_wait_frac": min(1.0, result.pipe_wait_s / result.step_s),
            "time": time.time(),
        }
        if self.sample_order is not None:
            row["samples_sha"] = samples_sha(self.sample_order, state.samples - global_batch, state.samples)
        if torch.cuda.is_available():
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return row


def _stream_opener(cfg: Config, dp_rank: int, dp_size: int) -> Callable[..., RankStream]:
    from raylm.data.stream import build_rank_stream

    def open_stream(split: str, start_sample: int, first_read_stall_s: float = 0.0) -> RankStream:
        return build_rank_stream(
            cfg,
            split,
            dp_rank=dp_rank,
            dp_size=dp_size,
            start_sample=start_sample,
            first_read_stall_s=first_read_stall_s,
        )

    return open_stream


def _peak_flops(cfg: Config, rank: int, world_size: int, workers_per_node: int) -> float | None:
    """Hardware peak of all workers for MFU: train.peak_tflops per worker when set, else the GPU's dense peak
    for the run's precision from the table (None and a warning for a GPU it lacks), else on CPU a matmul
    measured now on the node's cores. Only rank 0 logs metrics, so only rank 0 measures or warns."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12 * world_size
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name, cfg.train.precision)
        if peak is None and rank == 0:
            get_logger().warning(
                "no peak FLOP/s known for GPU %r, so mfu is null; set train.peak_tflops to its "
                "dense %s peak per GPU in TFLOP/s",
                name,
                cfg.train.precision,
            )
        return None if peak is None else peak * world_size
    if rank != 0:
        return None
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        peak = measure_matmul_peak(dtype, seconds=0.3)
    finally:
        torch.set_num_threads(threads)
    return peak * max(1, world_size // workers_per_node)
