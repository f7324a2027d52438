"""How many trials run at once and what each one's workers get: sized from one trial's share of the cluster."""

from __future__ import annotations

from dataclasses import dataclass

from raylm.config import Config
from raylm.config.layout import num_workers
from raylm.errors import ConfigError
from raylm.train.driver import DATA_CPU_RESERVE

TRIAL_DRIVER_CPU = 0.01  # the Tune actor that runs a trial's TorchTrainer only waits: a token CPU


@dataclass(frozen=True)
class TrialShare:
    concurrent: int
    cpus_per_worker: float
    torch_threads: int
    use_gpu: bool


def trial_share(cfg: Config, cluster: dict[str, float], trials: int) -> TrialShare:
    """tune.max_concurrent (0 = as many as fit, capped at the trial count); an explicit value that cannot fit is
    refused, saying what fits. A trial fits per `workers` GPUs, or on CPUs per `workers` CPUs (one core each)."""
    workers, gpus, cpus = num_workers(cfg), cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    use_gpu = {"true": True, "false": False}.get(cfg.parallel.use_gpu, gpus >= workers)
    fit = int(gpus // workers) if use_gpu else max(1, int(cpus // workers))
    unit = f"{workers} GPU(s)" if use_gpu else f"{workers} CPU(s)"
    have = f"{gpus:g} GPUs" if use_gpu else f"{cpus:g} CPUs"
    if cfg.tune.max_concurrent > fit:
        raise ConfigError(
            f"tune.max_concurrent={cfg.tune.max_concurrent} cannot fit: each trial needs {unit} "
            f"(pp*tp*dp workers) and the cluster has {have}, which fits {fit}; set "
            f"tune.max_concurrent={fit}, or 0 for as many as fit"
        )
    concurrent = max(1, min(cfg.tune.max_concurrent or fit, trials))
    if use_gpu:
        return TrialShare(concurrent, cfg.parallel.cpus_per_worker or 1.0, cfg.train.torch_threads, True)
    share = (cpus - DATA_CPU_RESERVE - concurrent * TRIAL_DRIVER_CPU) / (concurrent * workers)
    cpus_per_worker = cfg.parallel.cpus_per_worker or _ray_cpus(share)
    threads = cfg.train.torch_threads or max(1, int(cpus // (concurrent * workers)))
    return TrialShare(concurrent, cpus_per_worker, threads, False)


def _ray_cpus(share: float) -> float:
    """Ray takes whole CPUs at or above one, fractions below; never less than 0.05."""
    return float(int(share)) if share >= 1.0 else max(0.05, int(share * 20) / 20)
