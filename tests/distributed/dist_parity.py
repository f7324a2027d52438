"""Parity fixtures: a tiny config, deterministic global batches, the single-process reference and the rank worker."""

from __future__ import annotations

import time

import torch

from raylm.config import resolve
from raylm.config.derived import micro_batches_for, padded_vocab

STEPS = 5
GRAD_CLIP = 0.5  # low enough that some steps clip, so the distributed grad norm is exercised
BASE = {
    "data": {"vocab_size": 300, "seq_len": 16},  # padded to 384: rows 300..383 are never targets
    "model": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 16},
    "parallel": {"micro_batch": 2},
    "train": {"global_batch": 8, "grad_clip": GRAD_CLIP, "precision": "fp32"},
    # eps above the gradient entries makes AdamW's step ~ lr * m / eps, proportional to the gradient: a wrong
    # gradient scale (a missing DP or TP average) then shows in the weights, and Adam's division by sqrt(v)
    # cannot blow up rounding noise in near-zero gradients into 1e-5-level weight differences
    "optim": {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-2},
    "run": {"seed": 7},
}


def tiny_cfg(pp: int, tp: int, dp: int, *overrides: str):
    """The parity config for one layout, plus dotted overrides (e.g. 'model.tie_embeddings=false')."""
    return resolve(BASE, [f"parallel.pp={pp}", f"parallel.tp={tp}", f"parallel.dp={dp}", *overrides])


def global_batches(cfg, steps: int = STEPS, seed: int = 0) -> list[tuple]:
    """`steps` global batches of (inputs, labels), each (global_batch, seq_len); some labels are -100. Under
    data.document_mask a fifth of the tokens end a document (EOT) and inputs is the stream's (tokens, doc_ids,
    positions)."""
    from raylm.data.documents import document_ids, document_positions
    from raylm.data.tokenizer import EOT_ID

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens = torch.randint(
            0, cfg.data.vocab_size, (cfg.train.global_batch, cfg.data.seq_len + 1), generator=gen
        )
        if cfg.data.document_mask:
            tokens[torch.rand(tokens.shape, generator=gen) < 0.2] = EOT_ID
        labels = tokens[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=gen) < 0.1] = -100  # exercise ignore_index
        inputs = tokens[:, :-1].contiguous()
        if cfg.data.document_mask:
            window = inputs.numpy()
            positions = document_positions(window, cfg.data.document_positions)
            inputs = (inputs, torch.from_numpy(document_ids(window)), torch.from_numpy(positions))
        batches.append((inputs, labels))
    return batches


def micro_batches(global_batch: tuple, cfg, dp_rank: int):
    """The micro-batches DP rank `dp_rank` trains on: samples i with i % dp == dp_rank, in order."""
    mb, dp = cfg.parallel.micro_batch, cfg.parallel.dp
    inputs, labels = global_batch
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    parts, labels = tuple(t[dp_rank::dp] for t in parts), labels[dp_rank::dp]

    def rows(i: int):
        chunk = tuple(t[i : i + mb] for t in parts)
        return chunk if isinstance(inputs, tuple) else chunk[0]

    return [(rows(i), labels[i : i + mb]) for i in range(0, labels.size(0), mb)]


def model_loss(model, inputs, labels) -> torch.Tensor:
    """The plain GPT's loss on a micro-batch whose inputs may carry document boundaries."""
    if isinstance(inputs, tuple):
        return model(inputs[0], labels, documents=inputs[1:])
    return model(inputs, labels)


def reference_run(
    cfg, weights: dict, batches: list, grad_masks: dict | None = None
) -> tuple[list[float], dict, list[float]]:
    """Plain GPT + torch AdamW on one process: per-step losses, final weights and pre-clip grad norms;
    `grad_masks` (name -> bool) zero those parameters' gradients where False (sparse fine-tuning)."""
    from raylm.model.gpt import GPT

    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(weights)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )
    losses, norms = [], []
    for batch in batches:
        # the engine's objective: the mean over (DP rank, micro-batch) of each micro-batch's mean loss
        chunks = [mb for r in range(cfg.parallel.dp) for mb in micro_batches(batch, cfg, r)]
        loss = sum(model_loss(model, x, y) for x, y in chunks) / len(chunks)
        loss.backward()
        for name, mask in (grad_masks or {}).items():
            model.get_parameter(name).grad.mul_(mask)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def train_layouts(rank: int, world_size: int, layouts: list[tuple]) -> list[dict]:
    """Rank worker: for each (pp, tp, dp, overrides) train STEPS steps; losses per rank, weights from rank 0."""
    from raylm.parallel.engine import build_engine

    out = []
    for pp, tp, dp, overrides in layouts:
        cfg = tiny_cfg(pp, tp, dp, *overrides)
        engine = build_engine(cfg)  # each rank draws only its own slices; the reference draws the whole model
        assert engine.micro_batches == micro_batches_for(cfg.train.global_batch, cfg)
        dp_rank = engine.coords.dp_rank
        losses, wait_fracs = [], []
        for batch in global_batches(cfg):
            data = iter(micro_batches(batch, cfg, dp_rank)) if engine.reads_data else None
            start = time.perf_counter()
            losses.append(engine.train_batch(data))
            wait_fracs.append(engine.take_pipe_wait_s() / (time.perf_counter() - start))
        full = engine.full_state_dict()
        out.append({"losses": losses, "pipe_wait_fracs": wait_fracs, "weights": full if rank == 0 else None})
    return out


def reference_eval(cfg, weights: dict, batch) -> float:
    """The engine's eval objective on one process: mean over (DP rank, micro-batch) of micro-batch mean losses."""
    from raylm.model.gpt import GPT

    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(weights)
    chunks = [mb for r in range(cfg.parallel.dp) for mb in micro_batches(batch, cfg, r)]
    with torch.no_grad():
        return (sum(model_loss(model, x, y) for x, y in chunks) / len(chunks)).item()


def ramp_batches(cfg) -> list:
    """Two steps of a batch ramp: half the global batch, then the full one."""
    first, second, _ = global_batches(cfg, steps=3)
    half = cfg.train.global_batch // 2
    return [(first[0][:half], first[1][:half]), second]


def ramp_eval_load(rank: int, world_size: int, layout: tuple) -> dict:
    """Batch ramp (set_micro_batches), eval_batch, then load_full_state_dict + a zero-lr step (set_lr)."""
    from raylm.model.gpt import init_full_weights
    from raylm.model.weights import InMemoryWeights
    from raylm.parallel.engine import build_engine

    pp, tp, dp, overrides = layout
    cfg = tiny_cfg(pp, tp, dp, *overrides)
    weights = init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), cfg.run.seed)
    engine = build_engine(cfg, InMemoryWeights(weights))
    dp_rank, losses = engine.coords.dp_rank, []
    feed = lambda batch: iter(micro_batches(batch, cfg, dp_rank)) if engine.reads_data else None  # noqa: E731
    for batch in ramp_batches(cfg):
        engine.set_micro_batches(batch[0].size(0) // (cfg.parallel.micro_batch * dp))
        losses.append(engine.train_batch(feed(batch)))
    eval_batch = global_batches(cfg, steps=3)[2]
    eval_loss = engine.eval_batch(feed(eval_batch), num_micro_batches=len(micro_batches(eval_batch, cfg, 0)))
    trained = engine.full_state_dict()
    engine.load_full_state_dict(weights)
    engine.set_lr(0.0)  # the step must keep the loaded weights: stale optimizer masters would reappear here
    reload_loss = engine.train_batch(feed(ramp_batches(cfg)[1]))
    reloaded = engine.full_state_dict()
    keep = rank == 0
    return {
        "losses": losses,
        "eval": eval_loss,
        "trained": trained if keep else None,
        "reload_loss": reload_loss,
        "reloaded": reloaded if keep else None,
    }


def zero3_stage_as_built(rank: int, world_size: int, layout: tuple) -> dict:
    """Build a ZeRO-3 stage the way build_engine does (no initialize): the whole-tensor elements the earlier
    layers still held when each layer was built, and per parameter (elements held whole, this rank's partition,
    full elements) once all are built. Then build_engine's own: the bytes of fp32 masters it left unaliased."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    from raylm.parallel.ds_config import TrainSpec, build_ds_config
    from raylm.parallel.engine import build_engine
    from raylm.parallel.pipeline import SingleStage, ds_topology
    from raylm.parallel.tensor import TPGroup
    from raylm.parallel.topology import Topology
    from raylm.parallel.zero_init import alias_fp32_masters, layer_partitioner

    pp, tp, dp, overrides = layout
    cfg = tiny_cfg(pp, tp, dp, *overrides)
    spec = TrainSpec.from_config(cfg)
    mpu = PipelineParallelGrid(topology=ds_topology(Topology.from_config(cfg.parallel, world_size)))
    partition = layer_partitioner(
        build_ds_config(cfg.parallel, spec), mpu, mpu.get_data_parallel_group(), torch.float32
    )
    built, held = [], []

    def on_built(layer):
        held.append(sum(p.numel() for earlier in built for p in earlier.parameters()))
        partition(layer)
        built.append(layer)

    stage = SingleStage(cfg.model, spec.vocab_size, TPGroup(None, 0, 1), False, on_built)
    return {
        "held_before_each_layer": held,
        "params": [(p.numel(), p.ds_tensor.numel(), p.ds_numel) for p in stage.parameters()],
        "second_master_bytes": alias_fp32_masters(build_engine(cfg).ds.optimizer),
    }


def run_jobs(rank: int, world_size: int, jobs: list[tuple]) -> list:
    """Run several checks in one process group: ('train' | 'bf16', [layouts]) | ('ramp', layout) | ('tp',) |
    ('zero3_build', layout) | ('block_saved_bytes', micro_batch, seq_len)."""
    from dist_tp_checks import block_saved_bytes, run_tp_checks

    out = []
    for kind, *args in jobs:
        if kind in ("train", "bf16"):
            out.append(train_layouts(rank, world_size, *args))
        elif kind == "ramp":
            out.append(ramp_eval_load(rank, world_size, *args))
        elif kind == "zero3_build":
            out.append(zero3_stage_as_built(rank, world_size, *args))
        elif kind == "block_saved_bytes":
            out.append(block_saved_bytes(*args))
        else:
            out.append(run_tp_checks())
    return out


def autograd_warnings(rank: int, world_size: int) -> list[str]:
    """Warnings a tied pp=2 engine raises while built and trained for a step (DeepSpeed's tied-weight broadcast
    used to record c10d::broadcast_ on the parameter, and autograd warned at every backward)."""
    import warnings

    from raylm.parallel.engine import build_engine

    cfg = tiny_cfg(2, 1, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = build_engine(cfg)
        batch = global_batches(cfg, steps=1)[0]
        engine.train_batch(iter(micro_batches(batch, cfg, 0)) if engine.reads_data else None)
    return [str(w.message) for w in caught if "autograd" in str(w.message)]
