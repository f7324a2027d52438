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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, fn, args, results) -> None:
    on_gpu = backend == "nccl"  # rank r drives GPU r
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank if on_gpu else 0),
                      LOCAL_WORLD_SIZE=str(world_size if on_gpu else 1), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
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


def run_world(world_size: int, fn, *args, backend: str = "gloo") -> list:
    """fn(rank, world_size, *args) on every rank; returns the results in rank order or raises a rank's error."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"ranks died (exit codes {dead}) or exceeded {TIMEOUT_S} s") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
