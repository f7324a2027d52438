"""The CPU as planner hardware: matmul peak, memory bandwidth, gloo all-reduce and send bandwidth between two
processes, what an all-reduce between compute segments waits, and an idle rank's memory, measured once on this
machine and cached in the user's cache folder.

`raylm plan --gpu cpu` and `parallel.layout=auto` on a CPU cluster read the cache; `--recalibrate` (or a cache
written by another torch, core count or machine) measures again, which takes about ten seconds.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from raylm.log import get_logger
from raylm.plan.hardware import Hardware
from raylm.plan.peaks import measure_matmul_peak

CACHE_NAME = "cpu-calibration.json"
COMM_BYTES = 32 << 20  # the tensor all-reduced and sent between the two processes
COMM_REPEATS = 5
COPY_BYTES = 256 << 20  # the tensor copied to measure memory bandwidth
CALIBRATION_VERSION = 2  # a cache from an older raylm lacks figures this one reads: measured again
SYNC_BYTES = 1 << 20  # a TP all-reduce of a small model's activation
SYNC_MATMUL = (256, 512)  # a compute segment between two collectives: four (256 x 512) @ (512 x 512) matmuls
SYNC_ROUNDS = 40
CPU_MATMUL_EFF = 0.8  # a plain loop reaches ~0.86 of the matmul peak on CPU; DeepSpeed's engine a little less
CPU_MATMUL_KNEE = 16  # CPU kernels reach their peak on much smaller matrices than a GPU's
CPU_BLOCK_OVERHEAD_S = 300e-6  # eager PyTorch: ~100 ops per block forward and backward
CPU_LINK_EFF = 1.0  # the all-reduce bandwidth below is already what gloo's ring reaches
# a gloo rank's fixed cost when this machine has no calibration (_framework_rank measured 0.45 GB here)
IDLE_RANK_BYTES = 0.45e9
FRAMEWORK_PROBE = [  # the almost empty model _framework_rank trains, over dp = 2
    "model.n_layer=1",
    "model.d_model=64",
    "model.n_head=4",
    "data.vocab_size=512",
    "data.seq_len=32",
    "model.max_seq_len=32",
    "parallel.pp=1",
    "parallel.dp=2",
    "parallel.micro_batch=1",
    "train.global_batch=2",
]


def cache_path() -> Path:
    """$XDG_CACHE_HOME/raylm (else ~/.cache/raylm)/cpu-calibration.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "raylm" / CACHE_NAME


def machine_key() -> dict:
    """What a calibration is valid for: this host, its usable cores and the torch that measured it."""
    import torch

    return {
        "host": socket.gethostname(),
        "cores": cpu_cores(),
        "torch": torch.__version__,
        "calibration": CALIBRATION_VERSION,
    }


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_hardware(recalibrate: bool = False) -> Hardware:
    """This machine as one node of CPU ranks, from the cache or measured now (and cached)."""
    path = cache_path()
    figures = None if recalibrate else _read(path)
    if figures is None or figures.get("key") != machine_key():
        get_logger().info("measuring this CPU for the planner (once; cached in %s)", path)
        figures = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures, indent=1))
        tmp.replace(path)
    return hardware_of(figures)


def cpu_memory_hardware() -> Hardware:
    """This machine for memory predictions only, measuring nothing: the cached calibration when it is this
    machine's, else its RAM and a typical idle rank (its compute figures are then placeholders)."""
    figures = _read(cache_path())
    if figures is not None and figures.get("key") == machine_key():
        return hardware_of(figures)
    unmeasured = {
        "key": machine_key(),
        "matmul_fp32": 1.0,
        "matmul_bf16": 1.0,
        "mem_bw": 1.0,
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "allreduce_bw": 1.0,
        "send_bw": 1.0,
        "latency_s": 0.0,
        "sync_wait_s": 0.0,
        "idle_rank_bytes": IDLE_RANK_BYTES,
    }
    return hardware_of(unmeasured)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hardware_of(figures: dict) -> Hardware:
    """Hardware from measured figures: every rank of a node shares its cores, memory and memory bandwidth."""
    return Hardware(
        name="cpu",
        peak_flops={"fp32": figures["matmul_fp32"], "bf16": figures["matmul_bf16"]},
        mem_bytes=figures["ram_bytes"],
        mem_bw=figures["mem_bw"],
        intra_bw=figures["allreduce_bw"],
        inter_bw=figures["allreduce_bw"],
        p2p_bw=figures["send_bw"],
        latency_s=figures["latency_s"],
        framework_bytes=figures["idle_rank_bytes"],
        matmul_eff=CPU_MATMUL_EFF,
        link_eff=CPU_LINK_EFF,
        matmul_knee=CPU_MATMUL_KNEE,
        block_overhead_s=CPU_BLOCK_OVERHEAD_S,
        cores_per_node=figures["key"]["cores"],
        sync_wait_s=figures["sync_wait_s"],
    )


def measure() -> dict:
    """Every figure, measured now: matmuls and a copy in this process, the rest in two gloo processes."""
    import torch

    figures: dict = {"key": machine_key(), "measured_at": time.time(), "platform": platform.platform()}
    figures["matmul_fp32"] = measure_matmul_peak(torch.float32, seconds=1.0)
    figures["matmul_bf16"] = measure_matmul_peak(torch.bfloat16, seconds=1.0)
    figures["mem_bw"] = _copy_bandwidth()
    figures["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    port = _free_port()
    # fresh interpreters (not multiprocessing's children, which import the caller's main module and inherit its
    # peak RSS): what an idle training rank holds is what they hold
    procs = [
        subprocess.Popen(  # noqa: S603  this module, with two integers
            [sys.executable, "-m", "raylm.plan.calibrate", str(rank), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for rank in range(2)
    ]
    comm = [json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1]) for proc in procs]
    rank0 = next(r for r in comm if r["rank"] == 0)
    figures.update({k: v for k, v in rank0.items() if k != "rank"})
    figures["idle_rank_bytes"] = max(r["idle_rank_bytes"] for r in comm)
    return figures


def _copy_bandwidth() -> float:
    """Bytes/s read plus written by a large tensor copy (the best of five)."""
    import torch

    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * COPY_BYTES / (time.perf_counter() - start))
    return best


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM: unlike ru_maxrss, not inherited across exec
    from the process that forked it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _framework_rank(rank: int, port: int) -> int:
    """Join a gloo group of two as a training rank does and train one step of an almost empty model (a layout of
    dp=2): the peak RSS then is the framework's fixed cost (Python, torch, DeepSpeed and its op, gloo, the
    engine's own structures), the model's share of it a few MB."""
    import torch

    from raylm.config import resolve
    from raylm.parallel.ds_import import import_deepspeed

    import_deepspeed()  # as a rank imports it (raylm.train.session)
    from raylm.parallel.engine import build_engine, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed("gloo")
    cfg = resolve({}, FRAMEWORK_PROBE)
    engine = build_engine(cfg)
    tokens = torch.randint(0, cfg.data.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len + 1))
    engine.train_batch(iter([(tokens[:, :-1], tokens[:, 1:])] * engine.micro_batches))
    return peak_rss_bytes()


def _comm_rank(rank: int, port: int) -> dict:
    """One of two gloo processes: a rank's fixed memory, all-reduce bandwidth, send bandwidth and latency."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    idle = _framework_rank(rank, port)
    tensor = torch.ones(COMM_BYTES // 4)
    dist.all_reduce(tensor)  # warm up the connection
    allreduce_s = _best_of(lambda: dist.all_reduce(tensor))
    peer = 1 - rank

    def exchange() -> None:  # rank 0 sends, rank 1 receives: one pipeline hop
        if rank == 0:
            dist.send(tensor, peer)
        else:
            dist.recv(tensor, peer)
        dist.barrier()

    barrier_s = _best_of(dist.barrier)
    send_s = max(1e-9, _best_of(exchange) - barrier_s)
    small = torch.ones(1)
    latency_s = _best_of(lambda: dist.all_reduce(small))
    sync_wait_s = _sync_wait_s()
    dist.destroy_process_group()
    return {
        "rank": rank,
        "idle_rank_bytes": idle,
        # a ring all-reduce over 2 moves 2 (n - 1) / n = 1 times the bytes through each link
        "allreduce_bw": COMM_BYTES / allreduce_s,
        "send_bw": COMM_BYTES / send_s,
        "latency_s": latency_s / 2,
        "sync_wait_s": sync_wait_s,
    }


def _sync_wait_s() -> float:
    """Both ranks compute on their core and all-reduce SYNC_BYTES between segments, as TP does: the time a round
    takes beyond the same compute alone and the all-reduce alone (the best of COMM_REPEATS each)."""
    import torch
    import torch.distributed as dist

    rows, width = SYNC_MATMUL
    a, b = torch.randn(rows, width), torch.randn(width, width)
    tensor = torch.ones(SYNC_BYTES // 4)

    def rounds(communicate: bool) -> None:
        for _ in range(SYNC_ROUNDS):
            for _ in range(4):
                torch.mm(a, b)
            if communicate:
                dist.all_reduce(tensor)
        dist.barrier()

    alone_s = _best_of(lambda: dist.all_reduce(tensor))
    compute_s = _best_of(lambda: rounds(False))
    both_s = _best_of(lambda: rounds(True))
    return max(0.0, (both_s - compute_s) / SYNC_ROUNDS - alone_s)


def _best_of(fn) -> float:
    best = float("inf")
    for _ in range(COMM_REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":  # one rank of measure()'s pair: python -m raylm.plan.calibrate RANK PORT
    print(json.dumps(_comm_rank(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
