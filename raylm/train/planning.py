"""`raylm train`'s use of the planner: the cluster's ranks and hardware, `parallel.layout=auto`, and the preflight
that refuses a layout predicted not to fit (unless --force)."""

from __future__ import annotations

from dataclasses import dataclass

from raylm.config import Config, with_overrides
from raylm.config.layout import Layout
from raylm.errors import ConfigError
from raylm.log import get_logger
from raylm.plan.decide import best_layout, check_fits, describe
from raylm.plan.hardware import GPUS, Hardware, gpu_hardware, gpu_kind_of
from raylm.plan.predict import Prediction

ACCELERATOR = "accelerator_type:"  # Ray's per-node resource naming the GPU model


@dataclass(frozen=True)
class ClusterShape:
    """What the planner needs to know of the cluster: GPUs, how many share a node, and which GPU."""

    gpus: int
    gpus_per_node: int
    gpu_kind: str | None  # a kind of raylm.plan.hardware's table, or None (unknown or none)
    accelerator: str  # Ray's name for it ('' when the nodes name none)


def cluster_shape() -> ClusterShape:
    """The connected Ray cluster's GPUs, the most on one node, and their model."""
    import ray

    per_node = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    gpus = [int(r.get("GPU", 0)) for r in per_node]
    names = sorted({key[len(ACCELERATOR) :] for r in per_node for key in r if key.startswith(ACCELERATOR)})
    accelerator = names[0] if len(names) == 1 else ",".join(names)
    kind = gpu_kind_of(accelerator) if len(names) == 1 else None
    return ClusterShape(sum(gpus), max(gpus, default=0), kind, accelerator)


def uses_gpus(cfg: Config, cluster: ClusterShape, workers: int) -> bool:
    """Whether the run's workers take GPUs: parallel.use_gpu, or under auto whether the cluster has enough."""
    return {"true": True, "false": False}.get(cfg.parallel.use_gpu, cluster.gpus >= max(workers, 1))


def hardware_of(cfg: Config, cluster: ClusterShape, gpus: bool, measure: bool) -> tuple[Hardware, int] | None:
    """The planner's hardware and ranks per node for this run; None when the GPU is not in raylm's table.
    On CPU every rank is taken to share one node; `measure` calibrates the CPU (once, cached) for speeds."""
    from raylm.plan.calibrate import cpu_hardware, cpu_memory_hardware

    if gpus:
        if cluster.gpu_kind is None:
            return None
        return gpu_hardware(cluster.gpu_kind), cluster.gpus_per_node
    hw = cpu_hardware() if measure else cpu_memory_hardware()
    return hw, max(1, cfg.parallel.num_workers or Layout.of(cfg.parallel).world_size)


def choose_layout(cfg: Config, cluster: ClusterShape) -> tuple[Config, Prediction]:
    """parallel.layout=auto: the best predicted layout for the workers this run gets (the cluster's GPUs, or
    parallel.num_workers), as the config the run trains with."""
    workers = cfg.parallel.num_workers
    gpus = uses_gpus(cfg, cluster, workers)
    if gpus:
        workers = workers or cluster.gpus
    if workers <= 0:
        raise ConfigError(
            "parallel.layout=auto on a cluster without GPUs needs the worker count; set parallel.num_workers=N"
        )
    found = hardware_of(cfg, cluster, gpus, measure=True)
    if found is None:
        raise ConfigError(
            f"parallel.layout=auto needs the GPU's figures, but the cluster's {cluster.accelerator or 'GPUs'} "
            f"is not one of {', '.join(GPUS)}; set parallel.layout=manual and the degrees (`raylm plan --gpu "
            f"h100 --gpu-mem GB` estimates a similar part)"
        )
    hw, per_node = found
    if not gpus:
        per_node = workers
    best = best_layout(cfg, hw, workers, min(per_node, workers))
    chosen = with_overrides(cfg, [*best.overrides(), "parallel.num_workers=0"])
    get_logger().info("parallel.layout=auto on %d %s ranks: %s", workers, hw.name, describe(best))
    return chosen, best


def preflight(cfg: Config, cluster: ClusterShape) -> Prediction | None:
    """The config's own layout against its predicted memory: ConfigError with the figure and a layout that fits
    when it is predicted not to. None when the hardware is not in raylm's table (nothing to predict with)."""
    workers = Layout.of(cfg.parallel).world_size
    found = hardware_of(cfg, cluster, uses_gpus(cfg, cluster, workers), measure=False)
    if found is None:
        return None
    hw, per_node = found
    return check_fits(cfg, hw, min(per_node, workers), command="raylm plan CONFIG")
