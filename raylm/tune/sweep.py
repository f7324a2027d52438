"""`raylm sweep`: a Ray Tune search over config overrides, each trial one TorchTrainer run, ASHA on tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from raylm.config import Config, resolve, to_dict, with_overrides
from raylm.errors import ConfigError, RaylmError
from raylm.log import get_logger
from raylm.train.driver import build_trainer, with_absolute_paths
from raylm.train.preflight import check_prepared_data
from raylm.train.ray_cluster import connect_ray
from raylm.train.rundir import prepare_run_dir, remove_folder
from raylm.tune.space import load_space


def sweep(cfg: Config, space_path: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run the sweep; write <run.dir>/<tune.name>/trials.jsonl and best.yaml; return a summary."""
    from ray import tune

    cfg = with_absolute_paths(cfg)
    check_sweepable(cfg)
    space = load_space(space_path, cfg)
    check_prepared_data(cfg)
    sweep_dir = _prepare_sweep_dir(cfg, overwrite)
    connect_ray()
    tuner = tune.Tuner(
        tune.with_parameters(run_trial, base=to_dict(cfg), trials_dir=str(sweep_dir / "trials")),
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="min", scheduler=asha_for(cfg),
                                    num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=str(sweep_dir.parent), verbose=1),
    )
    results = tuner.fit()
    return write_results(cfg, results, sweep_dir)


def check_sweepable(cfg: Config) -> None:
    """ASHA compares trials on the metric at report steps: make sure reports carry it."""
    if cfg.tune.metric == "val_loss" and not cfg.train.eval_every:
        raise ConfigError("tune.metric=val_loss needs evaluations during the run; set train.eval_every=N "
                          "(the trials report at each evaluation) or tune.metric=loss")


def asha_for(cfg: Config):
    """ASHA over trained tokens: trials with different batch sizes are compared at equal data seen."""
    from ray.tune.schedulers import ASHAScheduler

    run_tokens = cfg.train.max_steps * cfg.train.global_batch * cfg.data.seq_len
    grace_tokens = cfg.tune.grace_tokens or run_tokens // 4
    # stop_last_trials=False: a trial that reaches the end finishes its run (and frees its workers) by itself
    return ASHAScheduler(time_attr="tokens", max_t=run_tokens, grace_period=max(1, grace_tokens),
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def trial_config(base: dict[str, Any], params: dict[str, Any], trials_dir: str, trial_name: str) -> Config:
    """A trial's run config: the base with the sampled overrides, its own run folder, reports at evaluations."""
    cfg = resolve(base, params)
    report_every = cfg.train.eval_every or cfg.train.report_every
    return with_overrides(cfg, {"run.dir": trials_dir, "run.name": trial_name, "train.report_every": report_every,
                                "checkpoint.resume": "never"})


def run_trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """Tune function trainable: one TorchTrainer run whose reports are forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, params, trials_dir, tune.get_context().get_trial_name())
    run_dir = prepare_run_dir(cfg, overwrite=True)
    build_trainer(cfg, run_dir, callbacks=[TuneReportCallback()]).fit()


def _prepare_sweep_dir(cfg: Config, overwrite: bool) -> Path:
    """<run.dir>/<tune.name>, created empty; tune.name is one folder name (validated), so this stays in run.dir."""
    sweep_dir = Path(cfg.run.dir) / cfg.tune.name
    if sweep_dir.is_symlink() or (sweep_dir.exists() and any(sweep_dir.iterdir())):
        if not overwrite:
            raise RaylmError(f"sweep folder {sweep_dir} already exists; pass --overwrite or set tune.name=...")
        remove_folder(sweep_dir, "sweep folder")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


def write_results(cfg: Config, results, sweep_dir: Path) -> dict[str, Any]:
    """trials.jsonl (one line per trial: params, last metrics, status) and best.yaml (a runnable config)."""
    lines, metric = [], cfg.tune.metric
    for result in results:
        metrics = result.metrics or {}
        lines.append({"trial": metrics.get("trial_id"), "params": result.config, "metric": metric,
                      "value": metrics.get(metric), "tokens": metrics.get("tokens"),
                      "error": str(result.error).splitlines()[0] if result.error else None})
    (sweep_dir / "trials.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    scored = [line for line in lines if line["value"] is not None and not line["error"]]
    if not scored:
        raise RaylmError(f"no trial of sweep {cfg.tune.name!r} reported {metric}; see {sweep_dir}/trials.jsonl")
    best = min(scored, key=lambda line: line["value"])
    best_cfg = with_overrides(cfg, {**best["params"], "run.name": f"{cfg.tune.name}-best"})
    (sweep_dir / "best.yaml").write_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
    get_logger().info("sweep %s: %d trials, best %s=%.4f with %s; %s", cfg.tune.name, len(lines), metric,
                      best["value"], best["params"], sweep_dir / "best.yaml")
    return {"sweep_dir": str(sweep_dir), "trials": len(lines), "best": best}
