"""`raylm sweep`: a Ray Tune search over config overrides, each trial one TorchTrainer run, ASHA on tokens.

Every check runs before Ray starts (space, combinations, budget, resume); then the Tuner runs (or is restored)
and the outputs are read back from the trial folders: trials.jsonl, decisions.jsonl, best.yaml, sweep.png/.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from raylm.checkpoint.commit import list_committed
from raylm.checkpoint.names import TRAINER_STATE_FILE
from raylm.config import Config, resolve, to_dict, with_overrides
from raylm.data.readers_lock import reading
from raylm.errors import ConfigError, RaylmError
from raylm.log import get_logger
from raylm.ray_connect import connect_ray
from raylm.storage.file_names import DECISIONS_FILE
from raylm.storage.uri import refuse_uri
from raylm.train.driver import build_trainer, with_absolute_paths
from raylm.train.kv import open_kv
from raylm.train.metrics import read_metrics
from raylm.train.preflight import check_prepared_data, local_data_folders
from raylm.train.run_folder import checkpoint_root, prepare_run_dir, remove_folder, run_path
from raylm.tune.asha import RungBook, read_decisions
from raylm.tune.pbt import PbtBook, lr_path, split_exploit
from raylm.tune.plan import SweepPlan, check_combinations, plan_sweep, trial_config, trial_overrides
from raylm.tune.report import plot_sweep, write_markdown
from raylm.tune.resources import TRIAL_DRIVER_CPU, trial_share
from raylm.tune.results import TRIAL_FILE, collect_trials, summarise, write_trials
from raylm.tune.resume import SWEEP_FILE, check_resumable, expected_trials
from raylm.tune.rung_decisions import clear as clear_decisions
from raylm.tune.space import Space, load_space
from raylm.tune.tracking import log_sweep, open_sweep_run
from raylm.tune.trial_actor import train_in_trial_actor, trains_in_trial_actor, trial_startup

METRICS = ("val_loss", "loss")
SWEEP_ON_URI = (
    "a sweep keeps its trials, exploits and summary in a local or shared folder (object storage is built "
    "for single runs); set run.dir to such a folder"
)


def sweep(
    cfg: Config, space_path: str | Path, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Run (or resume) the sweep and write its outputs in <run.dir>/<tune.name>/; return a summary."""
    refuse_uri("run.dir", cfg.run.dir, SWEEP_ON_URI)
    cfg = with_absolute_paths(cfg)
    space, plan = prepare(cfg, space_path)
    sweep_dir = Path(cfg.run.dir) / cfg.tune.name
    if resume:
        check_resumable(sweep_dir, cfg, space)
    check_prepared_data(cfg)
    if not resume:
        _prepare_sweep_dir(cfg, overwrite)
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps({"config": to_dict(cfg), "space": space.raw}, indent=1)
        )
    cfg = open_sweep_run(cfg, sweep_dir, space.raw)  # MLflow's parent run, when run.trackers has mlflow
    connect_ray(dashboard=True)  # trials Tune stops early release their resources through it
    open_kv()  # on this node: rung decisions go through it
    plan, concurrent = _with_share(cfg, space, plan)
    tuner = (
        _restore_tuner(cfg, sweep_dir, plan)
        if resume
        else _new_tuner(cfg, space, plan, sweep_dir, concurrent)
    )
    with reading(local_data_folders(cfg)):  # `raylm prepare` cannot replace the shards the trials read
        results = tuner.fit()
    clear_decisions(cfg.tune.name)  # any a trial ended without reading
    try:
        return write_outputs(cfg, plan, sweep_dir, _errors(results))
    finally:
        log_sweep(cfg, sweep_dir)


def prepare(cfg: Config, space_path: str | Path) -> tuple[Space, SweepPlan]:
    """Everything that can be refused before Ray starts: metric, scheduler, space, budget, combinations."""
    if cfg.tune.metric not in METRICS:
        raise ConfigError(
            f"tune.metric={cfg.tune.metric!r} is not reported by every trial; use one of {', '.join(METRICS)}"
        )
    space = load_space(space_path)
    if cfg.tune.search == "optuna":
        _check_optuna(space)
    plan = plan_sweep(cfg, space)
    checked = check_combinations(cfg, space, plan)
    get_logger().info(
        "sweep %s: %d trial(s) of %d tokens each, rungs at %s tokens, %d combination(s) of the "
        "space validated",
        cfg.tune.name,
        _trial_count(cfg, space),
        plan.budget_tokens,
        plan.milestones_tokens,
        checked,
    )
    return space, plan


def _check_optuna(space: Space) -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tune.search=optuna needs Optuna: pip install 'raylm[optuna]' (or use tune.search=random)"
        ) from None
    if any(p.kind == "grid" for p in space.params):
        raise ConfigError(
            f"{space.path}: tune.search=optuna samples; it cannot take grid keys: use choice there "
            f"or tune.search=grid"
        )


def _trial_count(cfg: Config, space: Space) -> int:
    return cfg.tune.num_samples * space.grid_points()


def _with_share(cfg: Config, space: Space, plan: SweepPlan) -> tuple[SweepPlan, int]:
    """Concurrency and per-worker CPUs/threads from one trial's share of the cluster now connected."""
    import dataclasses

    import ray

    share = trial_share(cfg, dict(ray.cluster_resources()), _trial_count(cfg, space))
    get_logger().info(
        "sweep %s: %d trial(s) at once, %.2f CPU(s) and %d torch thread(s) per worker",
        cfg.tune.name,
        share.concurrent,
        share.cpus_per_worker,
        share.torch_threads,
    )
    searches_layout = any(p.key.startswith("parallel.") for p in space.params)
    in_actor = trains_in_trial_actor(cfg, share.use_gpu) and not searches_layout
    plan = dataclasses.replace(
        plan,
        cpus_per_worker=share.cpus_per_worker,
        torch_threads=share.torch_threads,
        in_trial_actor=in_actor,
    )
    return plan, share.concurrent


def _trainable(cfg: Config, plan: SweepPlan, sweep_dir: Path):
    from ray import tune

    bound = tune.with_parameters(
        run_trial, base=to_dict(cfg), plan=plan, trials_dir=str(sweep_dir / "trials")
    )
    # a trial that trains in its actor takes its worker's CPUs there; else the actor only waits on its workers
    return tune.with_resources(
        bound, {"cpu": plan.cpus_per_worker if plan.in_trial_actor else TRIAL_DRIVER_CPU}
    )


def _new_tuner(cfg: Config, space: Space, plan: SweepPlan, sweep_dir: Path, concurrent: int):
    from ray import tune

    scheduler = _scheduler(cfg, plan, sweep_dir, concurrent, _trial_count(cfg, space))
    return tune.Tuner(
        _trainable(cfg, plan, sweep_dir),
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode="min",
            scheduler=scheduler,
            search_alg=_search_alg(cfg),
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrent,
            reuse_actors=plan.in_trial_actor,  # its imports and process group serve the next trial
        ),
        run_config=tune.RunConfig(
            name=cfg.tune.name,
            storage_path=str(sweep_dir.parent),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
        ),
    )


def _restore_tuner(cfg: Config, sweep_dir: Path, plan: SweepPlan):
    """Tuner.restore: unfinished and errored trials resume from their folders; finished and stopped stay so."""
    from ray import tune

    get_logger().info("resuming sweep %s from %s", cfg.tune.name, sweep_dir)
    return tune.Tuner.restore(
        str(sweep_dir),
        trainable=_trainable(cfg, plan, sweep_dir),
        resume_unfinished=True,
        resume_errored=True,
    )


def _scheduler(cfg: Config, plan: SweepPlan, sweep_dir: Path, concurrent: int, trials: int):
    from raylm.tune.scheduler import TokenPBTScheduler, TokenRungScheduler

    if cfg.tune.scheduler == "pbt":
        pbt_book = PbtBook(plan.milestones_tokens, seed=cfg.run.seed, space=plan.space_raw)
        return TokenPBTScheduler(pbt_book, cfg.tune.metric, str(sweep_dir / DECISIONS_FILE))
    book = RungBook(
        plan.milestones_tokens,
        cfg.tune.reduction_factor,
        total_trials=trials,
        stops=cfg.tune.scheduler == "asha",
    )
    return TokenRungScheduler(
        book,
        cfg.tune.metric,
        str(sweep_dir / DECISIONS_FILE),
        str(sweep_dir / "trials"),
        cfg.tune.name,
        concurrent,
    )


def _search_alg(cfg: Config):
    if cfg.tune.search != "optuna":
        return None  # Tune's variant generator: grid keys are crossed, the others sampled
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.run.seed)


def run_trial(params: dict[str, Any], base: dict[str, Any], plan: SweepPlan, trials_dir: str) -> None:
    """Tune function trainable: one TorchTrainer run whose reports Tune receives, or for a sweep of one-worker
    trials the rank itself, here (raylm.tune.trial_actor). A restarted trial keeps its folder and resumes from its
    newest committed checkpoint; after a PBT exploit it starts from the donor's."""
    import ray
    from ray import tune

    startup = trial_startup()
    params, exploit = split_exploit(params)
    context = tune.get_context()
    base_cfg = resolve(base)
    cfg = trial_config(base_cfg, params, plan, trials_dir, context.get_trial_id())
    run_dir = prepare_run_dir(cfg, overwrite=not _has_checkpoint(cfg))
    assert isinstance(run_dir, Path), SWEEP_ON_URI  # sweep() refused a run.dir on object storage
    info_path = run_dir / TRIAL_FILE
    info: dict[str, Any] = (
        json.loads(info_path.read_text()) if info_path.exists() else {"exploit_n": 0, "start_from": ""}
    )
    if exploit and exploit["n"] > info["exploit_n"]:
        info.update(
            exploit_n=exploit["n"], start_from=take_donor_checkpoint(run_dir, exploit, context.get_trial_id())
        )
    if info[
        "start_from"
    ]:  # the budget counts the donor's steps and tokens, then this config's batch schedule
        cfg = trial_config(
            base_cfg,
            params,
            plan,
            trials_dir,
            context.get_trial_id(),
            start=checkpoint_position(Path(info["start_from"])),
        )
        cfg = with_overrides(cfg, {"tune.start_from": info["start_from"]})
    info.update(
        trial_id=context.get_trial_id(),
        trial_name=context.get_trial_name(),
        params=trial_overrides(base_cfg, params, plan),
        max_steps=cfg.train.max_steps,
        actor_id=ray.get_runtime_context().get_actor_id(),
    )  # the Tune actor running it: `ray list actors`
    info_path.write_text(json.dumps(info))
    if plan.in_trial_actor:
        train_in_trial_actor(cfg, run_dir, startup)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(cfg, run_dir, callbacks=[TuneReportCallback()], startup=startup)
    startup.mark("fit_called")
    trainer.fit()


def take_donor_checkpoint(run_dir: Path, exploit: dict, trial_id: str) -> str:
    """Copy the donor's committed checkpoint next to the trial folders (the donor may prune its own) and drop the
    trial's own checkpoints, so its workers start from the copy. Returns the folder holding the copy."""
    source = Path(exploit["checkpoint"])
    folder = run_dir.parent.parent / "exploits" / f"{trial_id}-{exploit['n']}-from-{exploit['donor']}"
    shutil.copytree(source, folder / source.name, dirs_exist_ok=True)
    shutil.rmtree(checkpoint_root(run_dir), ignore_errors=True)
    return str(folder)


def checkpoint_position(folder: Path) -> tuple[int, int]:
    """(steps, tokens) of the one checkpoint copied into a PBT start_from folder."""
    (state_file,) = folder.glob(f"*/{TRAINER_STATE_FILE}")
    state = json.loads(state_file.read_text())
    return int(state["step"]), int(state["tokens"])


def _has_checkpoint(cfg: Config) -> bool:
    return bool(list_committed(checkpoint_root(run_path(cfg))))


def _errors(results) -> dict[str, str]:
    """Trial id -> first line of its error, for the trials that failed."""
    errors = {}
    for result in results:
        if result.error:
            match = re.search(r"_([0-9a-f]{5}_[0-9]{5})", Path(result.path).name)
            trial_id = (result.metrics or {}).get("trial_id") or (match.group(1) if match else "?")
            errors[trial_id] = (str(result.error).strip().splitlines() or ["error"])[0]
    return errors


def write_outputs(cfg: Config, plan: SweepPlan, sweep_dir: Path, errors: dict[str, str]) -> dict[str, Any]:
    records = collect_trials(sweep_dir / "trials", sweep_dir / DECISIONS_FILE, plan, errors)
    write_trials(records, sweep_dir / "trials.jsonl")
    write_markdown(records, plan, cfg.tune.metric, sweep_dir / "sweep.md")
    plot_sweep(records, plan, cfg.tune.metric, sweep_dir / "sweep.png")
    unfinished = sum(r.status == "unfinished" for r in records)
    expected = expected_trials(sweep_dir, cfg)
    if unfinished or len(records) < expected:
        get_logger().warning(
            "sweep %s is unfinished (%d of %d trials started, %d unfinished); continue it with "
            "`raylm sweep ... --resume`",
            cfg.tune.name,
            len(records),
            expected,
            unfinished,
        )
        return {"sweep_dir": str(sweep_dir), "trials": len(records), "interrupted": True}
    summary = summarise(cfg, records, sweep_dir)
    if cfg.tune.scheduler == "pbt":
        summary["best_lr_path"] = str(write_lr_path(records, summary["best"]["trial_id"], sweep_dir))
    return summary


def write_lr_path(records, best_id: str, sweep_dir: Path) -> Path:
    """best_lr_path.jsonl: the lr-vs-tokens schedule the best trial's weights followed across its exploits."""
    rows_of = {r.trial_id: read_metrics(Path(r.folder)) for r in records}
    exploits = [d for d in read_decisions(sweep_dir / "decisions.jsonl") if d["action"] == "exploit"]
    out = sweep_dir / "best_lr_path.jsonl"
    out.write_text("".join(json.dumps(p) + "\n" for p in lr_path(best_id, rows_of, exploits)))
    return out


def _prepare_sweep_dir(cfg: Config, overwrite: bool) -> Path:
    """<run.dir>/<tune.name>, created empty; tune.name is one folder name (validated), so this stays in run.dir."""
    sweep_dir = Path(cfg.run.dir) / cfg.tune.name
    if sweep_dir.is_symlink() or (sweep_dir.exists() and any(sweep_dir.iterdir())):
        if not overwrite:
            raise RaylmError(
                f"sweep folder {sweep_dir} already exists; pass --overwrite, --resume to continue it, "
                f"or set tune.name=..."
            )
        remove_folder(sweep_dir, "sweep folder")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir
