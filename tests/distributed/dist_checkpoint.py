"""Checkpoint rank workers: save under one layout, load under others, keep training; losses for the parent to compare.

The chain the parent runs, one spawned world per phase, all sharing one folder:

    phase_221      (4 ranks): (2,2,1) trains 2 steps, saves A, trains 3 more (the reference continuation)
    phase_111      (1 rank):  loads A, re-saves it as B, trains the 3 steps; a 5-layer model refuses A
    phase_221_back (4 ranks): fresh (2,2,1) engines load A and B, re-save them as A2 and B2, train the 3 steps
    phase_2        (2 ranks): (1,1,2) ZeRO-1 loads B, re-saves C0, trains step 3, saves C, trains 2 more; a fresh
                              (1,1,2) loads C and repeats them; (2,1,1) ZeRO-1 loads C, re-saves D0 and trains
                              them; cp = 2 (Ulysses) loads C, re-saves E0, trains step 4 and saves E, which
                              (1,1,2) ZeRO-1 loads for step 5; bf16 round trips (ZeRO-1 and BF16_Optimizer); a
                              truncated file fails every rank
    phase_zero3    (2 ranks): (1,1,2) ZeRO-3 loads B, re-saves Z0, trains step 3, saves Z3, trains 2 more; a fresh
                              ZeRO-3 engine loads Z3 and repeats them; (2,1,1) ZeRO-1 loads Z0, re-saves P0, trains
                              steps 3-5; a fresh ZeRO-3 engine loads P0, re-saves Z0B; resume=auto skips a
                              checkpoint whose file fails its sha256 on the loading ranks, resume=required stops
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from dist_parity import micro_batches, tiny_cfg

from raylm.config.derived import padded_vocab

SAVE_STEP = 2  # checkpoint A is taken after this many of the five batches
ZERO1 = "parallel.zero_stage=1"
ZERO3 = "parallel.zero_stage=3"
OTHER_SEED = 99  # fresh engines start from other weights, so a load that misses a tensor shows


def _engine(pp: int, tp: int, dp: int, *overrides: str, seed: int = OTHER_SEED):
    from raylm.model.weights import SeededInit
    from raylm.parallel.engine import build_engine

    cfg = tiny_cfg(pp, tp, dp, *overrides)
    return cfg, build_engine(cfg, SeededInit(cfg.model, padded_vocab(cfg.data.vocab_size), seed))


def full_label_batches(cfg, steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches with no ignored label: every micro-batch then holds as many targets as any other, so the
    loss (a mean of micro-batch means) is the same objective whatever dp groups the samples into."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, cfg.data.vocab_size, (steps, cfg.train.global_batch, cfg.data.seq_len + 1), generator=gen
    )
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _train(engine, cfg, steps: range) -> list[float]:
    batches = full_label_batches(cfg)
    feed = lambda b: iter(micro_batches(b, cfg, engine.coords.dp_rank)) if engine.reads_data else None  # noqa: E731
    return [engine.train_batch(feed(batches[i])) for i in steps]


def _state(step: int) -> dict:
    return {"step": step, "tokens": step * 8 * 16, "samples": step * 8}


def phase_221(rank: int, world_size: int, root: str) -> dict:
    from raylm.checkpoint import capture_rng, save_checkpoint

    cfg, engine = _engine(2, 2, 1, seed=cfg_seed())
    _train(engine, cfg, range(SAVE_STEP))
    path_a = save_checkpoint(engine, cfg, Path(root) / "A", SAVE_STEP, _state(SAVE_STEP), capture_rng())
    return {"A": str(path_a), "reference": _train(engine, cfg, range(SAVE_STEP, 5))}


def phase_111(rank: int, world_size: int, root: str) -> dict:
    from raylm.checkpoint import load_checkpoint, save_checkpoint
    from raylm.errors import CheckpointError

    cfg, engine = _engine(1, 1, 1)
    resumed = load_checkpoint(engine, cfg, _step_dir(root, "A", SAVE_STEP))
    path_b = save_checkpoint(engine, cfg, Path(root) / "B", resumed.step, resumed.trainer_state)
    out = {
        "B": str(path_b),
        "losses": _train(engine, cfg, range(SAVE_STEP, 5)),
        "has_rank_state": resumed.rank_state is not None,
    }
    deeper_cfg, deeper = _engine(1, 1, 1, "model.n_layer=5")
    try:
        load_checkpoint(deeper, deeper_cfg, _step_dir(root, "A", SAVE_STEP))
    except CheckpointError as exc:
        out["other_model_error"] = str(exc)
    return out


def phase_221_back(rank: int, world_size: int, root: str) -> dict:
    """A fresh (2,2,1) loads A directly, and B (A via (1,1,1)); both re-save and continue."""
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    out = {}
    for source, resave in (("A", "A2"), ("B", "B2")):
        cfg, engine = _engine(2, 2, 1)
        resumed = load_checkpoint(engine, cfg, _step_dir(root, source, SAVE_STEP))
        path = save_checkpoint(engine, cfg, Path(root) / resave, resumed.step, resumed.trainer_state)
        out[source] = {
            "resaved": str(path),
            "losses": _train(engine, cfg, range(SAVE_STEP, 5)),
            "trainer_state": resumed.trainer_state,
            "has_rank_state": resumed.rank_state is not None,
        }
    return out


def _step_dir(root: str, name: str, step: int) -> Path:
    return Path(root) / name / f"step-{step:08d}"


def phase_2(rank: int, world_size: int, root: str) -> dict:
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    cfg, engine = _engine(1, 1, 2, ZERO1)
    resumed = load_checkpoint(engine, cfg, _step_dir(root, "B", SAVE_STEP))
    path_c0 = save_checkpoint(engine, cfg, Path(root) / "C0", resumed.step, resumed.trainer_state)
    step3 = _train(engine, cfg, range(SAVE_STEP, SAVE_STEP + 1))
    path_c = save_checkpoint(engine, cfg, Path(root) / "C", SAVE_STEP + 1, _state(SAVE_STEP + 1))
    reference_c = _train(engine, cfg, range(SAVE_STEP + 1, 5))

    cfg, fresh = _engine(1, 1, 2, ZERO1)
    load_checkpoint(fresh, cfg, path_c)
    same_layout_c = _train(fresh, cfg, range(SAVE_STEP + 1, 5))

    cfg, pipe = _engine(2, 1, 1, ZERO1)
    load_checkpoint(pipe, cfg, path_c)
    path_d0 = save_checkpoint(pipe, cfg, Path(root) / "D0", SAVE_STEP + 1, _state(SAVE_STEP + 1))
    pp2 = _train(pipe, cfg, range(SAVE_STEP + 1, 5))
    return {
        "C0": str(path_c0),
        "C": str(path_c),
        "D0": str(path_d0),
        "chain": step3 + pp2,
        **context_parallel_resumes(root, path_c, step3),
        "reference_c": reference_c,
        "same_layout_c": same_layout_c,
        "bf16": bf16_round_trip(root),
        "corrupt_error": load_corrupt(pipe, cfg, path_c, Path(root) / "CORRUPT"),
    }


def context_parallel_resumes(root: str, path_c: Path, step3: list[float]) -> dict:
    """C (dp = 2) resumed under cp = 2 and re-saved as E0; step 4 under cp = 2, saved as E; step 5 under dp = 2
    from E. Losses of steps 3-5 ('cp_chain') for the reference."""
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    cfg, ulysses = _engine(1, 1, 1, "parallel.cp=2")
    load_checkpoint(ulysses, cfg, path_c)
    path_e0 = save_checkpoint(ulysses, cfg, Path(root) / "E0", SAVE_STEP + 1, _state(SAVE_STEP + 1))
    step4 = _train(ulysses, cfg, range(SAVE_STEP + 1, SAVE_STEP + 2))
    path_e = save_checkpoint(ulysses, cfg, Path(root) / "E", SAVE_STEP + 2, _state(SAVE_STEP + 2))
    cfg, replicas = _engine(1, 1, 2, ZERO1)
    load_checkpoint(replicas, cfg, path_e)
    return {"E0": str(path_e0), "cp_chain": step3 + step4 + _train(replicas, cfg, range(SAVE_STEP + 2, 5))}


def load_corrupt(engine, cfg, path: Path, copy_to: Path) -> str | None:
    """Every rank must raise (not hang) when one file is bad, even ranks that did not check that file."""
    from raylm.checkpoint import load_checkpoint
    from raylm.errors import CheckpointError

    if dist.get_rank() == 0:
        shutil.copytree(path, copy_to)
        with open(copy_to / "optim" / "000-tok_embeddings.pt", "r+b") as f:
            f.truncate(100)
    dist.barrier()
    try:
        load_checkpoint(engine, cfg, copy_to)
    except CheckpointError as exc:
        return str(exc)
    return None


def bf16_round_trip(root: str) -> list[dict]:
    """bf16 keeps fp32 masters in DeepSpeed's optimizer (ZeRO-1's, or on the pipeline at ZeRO 0 its BF16_Optimizer,
    which also partitions over DP; the plain engine runs ZeRO-1 for bf16 at ZeRO 0): save after one step, then the
    engine and a fresh one that loaded it take the next."""
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    out = []
    for pp, dp, zero in ((2, 1, 1), (2, 1, 0), (1, 2, 0)):
        overrides = ("train.precision=bf16", f"parallel.zero_stage={zero}")
        cfg, engine = _engine(pp, 1, dp, *overrides)
        _train(engine, cfg, range(1))
        path = save_checkpoint(engine, cfg, Path(root) / f"BF16-pp{pp}-dp{dp}-zero{zero}", 1, _state(1))
        continued = _train(engine, cfg, range(1, 2))
        cfg, fresh = _engine(pp, 1, dp, *overrides)
        load_checkpoint(fresh, cfg, path)
        out.append(
            {
                "optimizer": type(engine.ds.optimizer).__name__,
                "continued": continued,
                "resumed": _train(fresh, cfg, range(1, 2)),
            }
        )
    return out


def phase_zero3(rank: int, world_size: int, root: str) -> dict:
    from raylm.checkpoint import load_checkpoint, save_checkpoint

    cfg, engine = _engine(1, 1, 2, ZERO3)
    resumed = load_checkpoint(engine, cfg, _step_dir(root, "B", SAVE_STEP))
    path_z0 = save_checkpoint(engine, cfg, Path(root) / "Z0", resumed.step, resumed.trainer_state)
    step3 = _train(engine, cfg, range(SAVE_STEP, SAVE_STEP + 1))
    path_z3 = save_checkpoint(engine, cfg, Path(root) / "Z3", SAVE_STEP + 1, _state(SAVE_STEP + 1))
    reference_z3 = _train(engine, cfg, range(SAVE_STEP + 1, 5))

    cfg, fresh = _engine(1, 1, 2, ZERO3)
    load_checkpoint(fresh, cfg, path_z3)
    same_layout_z3 = _train(fresh, cfg, range(SAVE_STEP + 1, 5))

    cfg, pipe = _engine(2, 1, 1, ZERO1)
    load_checkpoint(pipe, cfg, path_z0)
    path_p0 = save_checkpoint(pipe, cfg, Path(root) / "P0", SAVE_STEP, _state(SAVE_STEP))
    pp2 = _train(pipe, cfg, range(SAVE_STEP, 5))

    cfg, back = _engine(1, 1, 2, ZERO3)
    load_checkpoint(back, cfg, path_p0)
    path_z0b = save_checkpoint(back, cfg, Path(root) / "Z0B", SAVE_STEP, _state(SAVE_STEP))
    return {
        "Z0": str(path_z0),
        "P0": str(path_p0),
        "Z0B": str(path_z0b),
        "chain": step3 + reference_z3,
        "reference_z3": reference_z3,
        "same_layout_z3": same_layout_z3,
        "pp2": pp2,
        "back": _train(back, cfg, range(SAVE_STEP, 5)),
        "fallback": resume_falls_back(back, Path(root), path_z0, path_z3),
    }


def resume_falls_back(engine, root: Path, older: Path, newer: Path) -> dict:
    """A run folder whose newest checkpoint has one altered byte (same size: only its sha256 can tell): auto
    resumes from the older one, required names the file. Only the loading ranks hash anything."""
    from raylm.errors import CheckpointError
    from raylm.train.checkpointing import resume

    run_dir = root / "RUN"
    if dist.get_rank() == 0:
        for folder in (older, newer):
            shutil.copytree(folder, run_dir / "checkpoints" / folder.name)
        bad = run_dir / "checkpoints" / newer.name / "model" / "001-layers.0.pt"
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    dist.barrier()
    cfg = tiny_cfg(1, 1, 2, ZERO3)
    info = resume(cfg, engine, run_dir, dist.get_rank())
    try:
        resume(tiny_cfg(1, 1, 2, ZERO3, "checkpoint.resume=required"), engine, run_dir, dist.get_rank())
        required_error = None
    except CheckpointError as exc:
        required_error = str(exc)
    return {"source": str(info.source), "step": info.state.step, "required_error": required_error}


def cfg_seed() -> int:
    return tiny_cfg(1, 1, 1).run.seed


def disk_full_save(rank: int, world_size: int, root: str) -> dict:
    """Save A, then save B with every write capped at a few KB (RLIMIT_FSIZE: what a full disk does to the
    writes), then B again once the cap is gone: the error, what the folder holds after it, and whether B works."""
    import resource
    import signal

    from raylm.checkpoint import capture_rng, list_checkpoints, save_checkpoint, verify_checkpoint
    from raylm.errors import CheckpointError

    cfg, engine = _engine(2, 1, 1, seed=cfg_seed())
    folder = Path(root) / "full"
    save_checkpoint(engine, cfg, folder, 1, _state(1), capture_rng())
    _train(engine, cfg, range(1))
    signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # a write past the cap then fails with EFBIG instead of killing
    cap = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, cap[1]))
    try:
        save_checkpoint(engine, cfg, folder, 2, _state(2), capture_rng())
        error = None
    except CheckpointError as exc:
        error = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, cap)
    dist.barrier()
    left = sorted(p.name for p in folder.iterdir())
    verify_checkpoint(list_checkpoints(folder)[0])
    retried = save_checkpoint(engine, cfg, folder, 2, _state(2), capture_rng())
    return {"error": error, "left": left, "retried": retried.name}


def background_saves(rank: int, world_size: int, root: str) -> dict:
    """(2,1,1): save step 1 in the loop and in the background, the background writer held after its layer files
    while step 2 trains and the loop polls; then a background save whose writes hit a file-size cap. What the
    folders held at each point, whether both saves hold the same tensors, and the error the failed one raised."""
    import resource
    import signal
    import threading

    from raylm.checkpoint import capture_rng, list_checkpoints, save_checkpoint
    from raylm.checkpoint.background import BackgroundSaver
    from raylm.errors import CheckpointError

    cfg, engine = _engine(2, 1, 1, seed=cfg_seed())
    _train(engine, cfg, range(1))
    in_loop = save_checkpoint(engine, cfg, Path(root) / "sync", 1, _state(1), capture_rng())
    held = threading.Event()
    saver = BackgroundSaver(cfg, engine.device)
    folder = Path(root) / "async"
    hold = lambda phase: held.wait(60) if phase == "mid-files" else None  # noqa: E731
    saver.start(engine, folder, 1, _state(1), capture_rng(), hold, after_commit=lambda path: None)
    _train(engine, cfg, range(1, 2))  # the next step changes every tensor the snapshot copied
    polls_held = [saver.poll() for _ in range(3)]
    listed_held = [p.name for p in list_checkpoints(folder)]
    dist.barrier()
    held.set()
    committed = saver.wait()
    out = {"polls_held": polls_held, "listed_held": listed_held, "committed": committed.name}
    out["same_files"] = _same_tensors(Path(in_loop), Path(committed))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG instead of killing
    cap = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, cap[1]))
    try:
        saver.start(engine, folder, 2, _state(2), capture_rng(), lambda phase: None, lambda path: None)
        while saver.poll() is None:  # every rank learns of the failure at the same poll
            pass
        out["error"] = None
    except CheckpointError as exc:
        out["error"] = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, cap)
    dist.barrier()
    out["left"] = sorted(p.name for p in folder.iterdir())
    saver.close()
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same tensor files with equal contents (the RNG file included)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*.pt"))
    if names != sorted(str(p.relative_to(b)) for p in b.rglob("*.pt")):
        return False
    return all(
        _equal(torch.load(a / n, weights_only=True), torch.load(b / n, weights_only=True)) for n in names
    )


def _equal(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y, strict=True))
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
