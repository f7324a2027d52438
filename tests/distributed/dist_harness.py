"""Run a function on N ranks in spawned processes (gloo on CPU, or nccl with a GPU each) and collect results."""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 240  # a hung collective fails the test instead of the whole suite
# Ranks fork from one server process that imported these once: a freshly spawned rank imports torch, DeepSpeed
# and raylm itself, seconds per rank on 2 cores. The server starts on the first spawn_ranks of a process.
# benchmarks/memory.py sets "spawn": it measures fresh processes.
START_METHOD = "forkserver"
PRELOAD = ["torch", "deepspeed", "raylm.parallel.engine", "raylm.train.worker"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, fn, args, results) -> None:
    on_gpu = backend == "nccl"  # rank r drives GPU r
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank if on_gpu else 0),
        LOCAL_WORLD_SIZE=str(world_size if on_gpu else 1),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # world_size ranks share 2 cores: one thread each avoids oversubscription
    try:
        from raylm.parallel.engine import init_distributed

        if on_gpu:
            torch.cuda.set_device(rank)
        init_distributed(backend)
        # serialized bytes: tensors sent through a torch queue are shared by fd, which dies with this process
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent rather than hanging it
        results.put((rank, "error", traceback.format_exc()))


def spawn_ranks(world_size: int, target, *args) -> tuple[list, object]:
    """Start target(rank, world_size, port, *args, results) in one process per rank, each forked from the
    preloaded server (START_METHOD) and given this process's environment as it is now; (processes, the queue
    they put their results on)."""
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_in_env, args=(env, target, r, world_size, port, *args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    return procs, results


def _in_env(env: dict[str, str], target, *args) -> None:
    """target(*args) with the parent's environment of the moment (the server's is the one it started with)."""
    os.environ.clear()
    os.environ.update(env)
    target(*args)


def run_world(world_size: int, fn, *args, backend: str = "gloo") -> list:
    """fn(rank, world_size, *args) on every rank; returns the results in rank order or raises a rank's error."""
    procs, results = spawn_ranks(world_size, _rank_main, backend, fn, args)
    return collect(procs, results, TIMEOUT_S)


class LostRank(RuntimeError):
    """A rank's process died by a signal (a SIGKILL) without reporting."""


LOST_RANK_GRACE_S = (
    5.0  # after a rank's error: time to see a peer that died (its death shows in others first)
)


def collect(procs: list, results, timeout_s: float) -> list:
    """Each rank's result in rank order; LostRank when a process died by a signal, RuntimeError with the
    rank's traceback when one failed. The processes are gone on return."""

    def died() -> list[int]:
        return [p.exitcode for p in procs if p.exitcode not in (None, 0)]

    out = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < len(procs):
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if any(code < 0 for code in died()):
                    raise LostRank(f"ranks died (exit codes {died()})") from None
                if died() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ranks died (exit codes {died()}) or exceeded {timeout_s} s"
                    ) from None
                continue
            if status == "error":
                grace = time.monotonic() + LOST_RANK_GRACE_S
                while time.monotonic() < grace and not died():
                    time.sleep(0.1)
                if any(code < 0 for code in died()):
                    raise LostRank(f"ranks died (exit codes {died()})")
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    return [out[r] for r in range(len(procs))]
