"""The DeepSpeed config dict, generated from the typed raylm config (the only place DeepSpeed keys are spelled)."""

from __future__ import annotations

from raylm.config.derived import micro_batches_for
from raylm.config.schema import Config

NEVER = 10**9  # steps_per_print: raylm logs its own metrics; DeepSpeed's per-step prints would only add noise


def zero_stage_for(cfg: Config) -> int:
    """ZeRO stage over DP: the configured one, but never above 1 with a pipeline (DeepSpeed refuses 2 and 3)."""
    stage = cfg.parallel.zero_stage
    return min(stage, 1) if cfg.parallel.pp > 1 else stage


def build_ds_config(cfg: Config, micro_batches: int | None = None) -> dict:
    """DeepSpeed's JSON config for one run; `micro_batches` defaults to train.global_batch's accumulation steps."""
    p = cfg.parallel
    micro_batches = micro_batches or micro_batches_for(cfg.train.global_batch, cfg)
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": p.micro_batch * micro_batches * p.dp,
        "gradient_clipping": cfg.train.grad_clip,
        # bf16 compute with fp32 master weights and fp32 gradient accumulation
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_optimization": {"stage": zero_stage_for(cfg)},
        # our torch.optim.AdamW is passed in; DeepSpeed would otherwise refuse it under ZeRO
        "zero_allow_untested_optimizer": True,
        "pipeline": {
            # activations are replicated across TP; sending them whole keeps the p2p path simple
            "pipe_partitioned": False,
            "grad_partitioned": False,
            "activation_checkpoint_interval": 1 if p.activation_checkpointing else 0,
        },
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
