"""Checks that run when a config is built, before any Ray worker starts: each failure is one line with the fix."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import math
import os
import re

from raylm.config.derived import kv_heads, samples_per_micro_step
from raylm.config.drills import DRILL, PHASES, parse_drills
from raylm.config.layout import Layout, batch_quantum, dp_sizes, is_elastic, worker_range
from raylm.config.loader import short_repr
from raylm.config.rope import rope_scaling_problem
from raylm.config.schema import TRACKERS, Config, field_choices
from raylm.errors import ConfigError, StorageError
from raylm.storage.uri import NOT_YET, SUPPORTED, is_uri, parse_uri, refuse_uri

RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MIN_BYTE_VOCAB = 256 + 3  # the byte alphabet plus the special tokens
MAX_NAMED = 8  # DP sizes named in one error line


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first impossible setting; return the config unchanged when it can run."""
    for check in (
        _check_run,
        _check_positive,
        _check_choices,
        _check_model,
        _check_dp_range,
        *LAYOUT_CHECKS,
        _check_plateau,
        _check_autos,
        _check_tune,
        _check_storage,
        _check_data,
        _check_drill,
        _check_trackers,
        _check_profile,
    ):
        check(cfg)
    return cfg


def check_layout(cfg: Config) -> None:
    """Only the checks that depend on the parallel degrees, the micro-batch and the batch: what raylm plan asks of
    each layout it considers (the same rules `validate` applies)."""
    for check in LAYOUT_CHECKS:
        check(cfg)


def _fail(message: str) -> None:
    raise ConfigError(message)


def _check_run(cfg: Config) -> None:
    for key, name, example in (
        ("run.name", cfg.run.name, "tiny-1"),
        ("tune.name", cfg.tune.name, "lr-sweep"),
    ):
        if not is_folder_name(name):
            _fail(
                f"{key}={name!r} must be one folder name of letters, digits, '.', '_' and '-' (not empty, "
                f"'.' or '..') so its folder stays inside run.dir; e.g. {key}={example}"
            )


def is_folder_name(name: object) -> bool:
    """A single safe path component: what run.name and tune.name must be, since raylm may delete that folder."""
    return isinstance(name, str) and bool(RUN_NAME.match(name)) and name not in (".", "..")


def _check_positive(cfg: Config) -> None:
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.global_batch": cfg.train.global_batch,
        "parallel.micro_batch": cfg.parallel.micro_batch,
        "optim.lr": cfg.optim.lr,
        "parallel.pp": cfg.parallel.pp,
        "parallel.tp": cfg.parallel.tp,
        "parallel.cp": cfg.parallel.cp,
        "parallel.dp": cfg.parallel.dp,
        "model.n_layer": cfg.model.n_layer,
        "model.n_head": cfg.model.n_head,
        "model.d_model": cfg.model.d_model,
        "data.seq_len": cfg.data.seq_len,
        "data.vocab_size": cfg.data.vocab_size,
        "model.max_seq_len": cfg.model.max_seq_len,
        "train.log_every": cfg.train.log_every,
        "train.report_every": cfg.train.report_every,
        "data.shard_tokens": cfg.data.shard_tokens,
        "checkpoint.keep": cfg.checkpoint.keep,
        "train.eval_batches": cfg.train.eval_batches,
        "fault.spike_window": cfg.fault.spike_window,
        "fault.collective_timeout_s": cfg.fault.collective_timeout_s,
        "fault.mtbf_hours": cfg.fault.mtbf_hours,
        "fault.straggler_steps": cfg.fault.straggler_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            _fail(f"{key}={value} must be positive; set {key} to a value > 0")
    if not 0 <= cfg.checkpoint.writer_nice <= 19:
        _fail(
            f"checkpoint.writer_nice={cfg.checkpoint.writer_nice} is not a nice value; set it between 0 and 19"
        )
    non_negative = {
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "fault.max_failures": cfg.fault.max_failures,
        "schedule.lr.warmup_steps": cfg.schedule.lr.warmup_steps,
        "train.grad_clip": cfg.train.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay,
        "parallel.cpus_per_worker": cfg.parallel.cpus_per_worker,
        "train.torch_threads": cfg.train.torch_threads,
        "train.peak_tflops": cfg.train.peak_tflops,
        "train.eval_samples": cfg.train.eval_samples,
        "fault.spike_sigma": cfg.fault.spike_sigma,
        "model.n_kv_head": cfg.model.n_kv_head,
        "model.ffn_hidden": cfg.model.ffn_hidden,
        "fault.resize_check_s": cfg.fault.resize_check_s,
        "fault.hang_s": cfg.fault.hang_s,
    }
    for key, value in non_negative.items():
        if value < 0:
            _fail(f"{key}={value} must not be negative; set {key} to 0 or more")
    if cfg.fault.straggler_factor <= 1.0:
        _fail(
            f"fault.straggler_factor={cfg.fault.straggler_factor} must be above 1 (a multiple of the median "
            f"rank's time); e.g. fault.straggler_factor=1.5"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        _fail(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1); e.g. data.val_fraction=0.02")


def _check_choices(cfg: Config) -> None:
    for key, value, allowed in field_choices(cfg):
        if value not in allowed:
            _fail(
                f"{key}={value!r} is not one of {', '.join(map(str, allowed))}; pick one, e.g. {key}={allowed[0]}"
            )


def _check_model(cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    if m.d_model % m.n_head:
        _fail(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head} "
            f"({m.d_model} / {m.n_head} = {m.d_model / m.n_head:.2f}); pick n_head dividing d_model"
        )
    if (m.d_model // m.n_head) % 2:
        _fail(
            f"head size d_model/n_head = {m.d_model // m.n_head} must be even for RoPE; change model.n_head"
        )
    if m.n_head % kv_heads(m):
        _fail(
            f"model.n_head={m.n_head} is not a multiple of model.n_kv_head={m.n_kv_head}; "
            f"pick n_kv_head dividing n_head"
        )
    problem = rope_scaling_problem(m.rope_scaling)
    if problem:
        _fail(f"model.rope_scaling={short_repr(m.rope_scaling, 120)}: {problem}")
    if cfg.data.seq_len > m.max_seq_len:
        _fail(
            f"data.seq_len={cfg.data.seq_len} is beyond the model's positions (model.max_seq_len={m.max_seq_len}); "
            f"raise model.max_seq_len to >= {cfg.data.seq_len} or lower data.seq_len"
        )
    if cfg.data.vocab_size < MIN_BYTE_VOCAB:
        _fail(
            f"data.vocab_size={cfg.data.vocab_size} is too small for the byte alphabet (256) plus special tokens; "
            f"set data.vocab_size >= {MIN_BYTE_VOCAB}"
        )
    del tp


def _check_dp_range(cfg: Config) -> None:
    """An elastic range [dp_min, dp_max]: sane bounds, dp inside them, no fixed worker count, not in a sweep."""
    p = cfg.parallel
    if not (p.dp_min or p.dp_max):
        return
    lo, hi = p.dp_min, p.dp_max
    if lo < 1:
        _fail(
            f"parallel.dp range [{lo}, {hi}] has min {lo} < 1: every worker group holds at least one DP replica; "
            f"e.g. parallel.dp=[1, {max(hi, 1)}]"
        )
    if lo > hi:
        _fail(
            f"parallel.dp range [{lo}, {hi}] has min {lo} > max {hi}; write it as [min, max], e.g. "
            f"parallel.dp=[{hi}, {lo}]"
        )
    if not lo <= p.dp <= hi:
        _fail(
            f"parallel.dp={p.dp} lies outside the range parallel.dp_min..dp_max = {lo}..{hi}; give only the "
            f"range (parallel.dp=[{lo}, {hi}]) or a dp inside it"
        )
    if is_elastic(p) and p.num_workers:
        _fail(
            f"parallel.num_workers={p.num_workers} fixes the worker count, but parallel.dp=[{lo}, {hi}] lets it "
            f"change; set parallel.num_workers=0"
        )
    if is_elastic(p) and cfg.tune.trial_of:
        _fail(
            f"parallel.dp=[{lo}, {hi}] (elastic) is for raylm train; a sweep trial runs a fixed layout, so set "
            f"parallel.dp to one number"
        )


def _check_layout(cfg: Config) -> None:
    """The (pp, cp, tp, dp) rules, from the one place (Layout) build_engine checks them too."""
    layout = Layout.of(cfg.parallel)
    if cfg.parallel.layout != "auto":  # under auto, num_workers is the count the planner fills
        layout.check_num_workers(cfg.parallel.num_workers)
    layout.check_model(cfg.model, cfg.data.vocab_size, cfg.parallel.zero_stage, cfg.data.seq_len)
    if cfg.data.document_mask and cfg.parallel.sequence_parallel:
        _fail(
            "data.document_mask=true with parallel.sequence_parallel=true is not supported yet (the document "
            "masks are built for whole sequences); set one of them to false"
        )


def _check_batch(cfg: Config) -> None:
    step = samples_per_micro_step(cfg)
    gb = cfg.train.global_batch
    if is_elastic(cfg.parallel):
        _check_elastic_batch(cfg)
    elif gb % step:
        _fail(
            f"train.global_batch={gb} is not divisible by parallel.micro_batch * dp = "
            f"{cfg.parallel.micro_batch} * {cfg.parallel.dp} = {step}; set train.global_batch to a multiple "
            f"of {step}, e.g. {max(step, gb // step * step)}"
        )
    samples = cfg.train.eval_samples
    if samples % step:
        _fail(
            f"train.eval_samples={samples} is not divisible by parallel.micro_batch * dp = "
            f"{cfg.parallel.micro_batch} * {cfg.parallel.dp} = {step}; set train.eval_samples to a multiple "
            f"of {step}, e.g. {max(step, samples // step * step)}"
        )


def _check_elastic_batch(cfg: Config) -> None:
    """Every dp of the range must divide the global batch into whole micro-batches: a resize keeps the batch."""
    p, gb = cfg.parallel, cfg.train.global_batch
    failing = list(itertools.islice((dp for dp in dp_sizes(p) if gb % (p.micro_batch * dp)), MAX_NAMED + 1))
    if not failing:
        return
    named = ", ".join(map(str, failing[:MAX_NAMED])) + (", ..." if len(failing) > MAX_NAMED else "")
    if len(dp_sizes(p)) > MAX_NAMED:  # no batch that every dp of a wide range divides is a practical one
        fix = "narrow the range"
    else:
        quantum = batch_quantum(p)
        fix = (
            f"set train.global_batch to a multiple of {quantum} (micro_batch * every dp), e.g. "
            f"{-(-gb // quantum) * quantum}, or narrow the range"
        )
    _fail(
        f"train.global_batch={gb} is not divisible by parallel.micro_batch * dp = {p.micro_batch} * dp for "
        f"dp = {named} of parallel.dp=[{p.dp_min}, {p.dp_max}]; {fix}"
    )


def _check_schedule(cfg: Config) -> None:
    ramp, gb, step = cfg.schedule.batch, cfg.train.global_batch, batch_quantum(cfg.parallel)
    if not ramp.start:
        return
    p = cfg.parallel
    quantum = (
        f"{step} (micro_batch * dp for every dp of parallel.dp=[{p.dp_min}, {p.dp_max}])"
        if is_elastic(p)
        else f"micro_batch * dp = {step}"
    )
    for key, value in (("start", ramp.start), ("increment", ramp.increment)):
        if value <= 0 or value % step:
            _fail(
                f"schedule.batch.{key}={value} must be a positive multiple of {quantum}; "
                f"e.g. schedule.batch.{key}={step}"
            )
    if ramp.start > gb:
        _fail(
            f"schedule.batch.start={ramp.start} exceeds train.global_batch={gb}; the ramp grows up to the global batch"
        )
    if ramp.ramp_tokens <= 0:
        _fail(
            f"schedule.batch.ramp_tokens={ramp.ramp_tokens} must be positive when the ramp is on; "
            f"e.g. schedule.batch.ramp_tokens={gb * cfg.data.seq_len * 20}"
        )


def _check_seq_len_schedule(cfg: Config) -> None:
    """schedule.seq_len: windows that cut every sample into whole windows (start = data.seq_len / 2^k), over a
    positive number of steps, each split evenly over the TP ranks under sequence parallelism."""
    warm, seq_len = cfg.schedule.seq_len, cfg.data.seq_len
    if not warm.start:
        return
    quotient = seq_len // warm.start if 0 < warm.start < seq_len else 0
    if quotient * warm.start != seq_len or quotient & (quotient - 1):
        halves = [seq_len >> k for k in range(1, 4) if seq_len % (1 << k) == 0]
        example = f"e.g. {', '.join(map(str, halves))}" if halves else "or 0 (no warm-up)"
        _fail(
            f"schedule.seq_len.start={warm.start} must be data.seq_len={seq_len} divided by a power of two "
            f"(each sample is cut into whole windows, doubling to data.seq_len); set it to {example}"
        )
    if warm.warmup_steps <= 0:
        _fail(
            f"schedule.seq_len.warmup_steps={warm.warmup_steps} must be positive when the warm-up is on; "
            f"e.g. schedule.seq_len.warmup_steps={max(1, cfg.train.max_steps // 10)}"
        )
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and warm.start % tp:
        _fail(
            f"schedule.seq_len.start={warm.start} is not divisible by parallel.tp={tp}, which "
            f"parallel.sequence_parallel=true splits each window's positions over; set schedule.seq_len.start "
            f"to a multiple of {tp}"
        )


LAYOUT_CHECKS = (_check_layout, _check_batch, _check_schedule, _check_seq_len_schedule)


def _check_storage(cfg: Config) -> None:
    """URIs only where raylm reads and writes object storage (run.dir, data.out_dir, data.paths, data.sources)."""
    for key in NOT_YET:
        section, _, name = key.partition(".")
        try:
            refuse_uri(key, getattr(getattr(cfg, section), name, ""), NOT_YET[key])
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
    sources = [s["path"] for s in cfg.data.sources if isinstance(s, dict) and isinstance(s.get("path"), str)]
    for key, values in (
        ("run.dir", [cfg.run.dir]),
        ("data.out_dir", [cfg.data.out_dir]),
        ("data.paths", cfg.data.paths),
        ("data.sources", sources),
    ):
        for value in values:
            if is_uri(value):
                _check_uri(key, value)


def _check_uri(key: str, value: str) -> None:
    try:
        uri = parse_uri(value, key)
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    if glob.has_magic(uri.key):
        _fail(
            f"{key} entry {value!r}: globs are not expanded on object storage; name a prefix (its text files are "
            f"read) or one object"
        )


def _check_plateau(cfg: Config) -> None:
    lr = cfg.schedule.lr
    if not 0.0 < lr.factor < 1.0:
        _fail(
            f"schedule.lr.factor={lr.factor} must lie in (0, 1): the plateau schedule multiplies the lr by it; "
            f"e.g. schedule.lr.factor=0.5"
        )
    if lr.patience < 1:
        _fail(
            f"schedule.lr.patience={lr.patience} must be at least 1 evaluation; e.g. schedule.lr.patience=2"
        )
    if lr.threshold < 0:
        _fail(f"schedule.lr.threshold={lr.threshold} must not be negative; e.g. schedule.lr.threshold=0.01")
    if lr.kind == "plateau" and not cfg.train.eval_every and not cfg.tune.rung_tokens:
        _fail(
            "schedule.lr.kind=plateau follows val_loss, but train.eval_every=0 evaluates only at the end; "
            "set train.eval_every=N"
        )


def _check_autos(cfg: Config) -> None:
    """parallel.layout=auto picks fixed degrees; checkpoint.interval=auto replaces every_steps."""
    p = cfg.parallel
    if p.layout == "auto" and is_elastic(p):
        _fail(
            f"parallel.layout=auto picks one fixed layout, but parallel.dp=[{p.dp_min}, {p.dp_max}] is a range; "
            f"set parallel.layout=manual or give parallel.dp one number"
        )
    if p.layout == "auto" and cfg.tune.trial_of:
        _fail(
            "parallel.layout=auto is for raylm train; a sweep's trials run one fixed layout, so pick it with "
            "`raylm plan` and set parallel.layout=manual with its degrees"
        )
    if cfg.checkpoint.interval == "auto" and cfg.checkpoint.every_steps:
        _fail(
            f"checkpoint.every_steps={cfg.checkpoint.every_steps} with checkpoint.interval=auto: the interval "
            f"is Young/Daly's; set checkpoint.every_steps=auto (or 0), or checkpoint.interval=steps"
        )


def _check_tune(cfg: Config) -> None:
    t = cfg.tune
    for key, value in (
        ("tune.num_samples", t.num_samples),
        ("tune.reduction_factor", t.reduction_factor - 1),
    ):
        if value <= 0:
            _fail(
                f"{key}={getattr(t, key.split('.')[1])} is too small; e.g. {key}="
                + ("4" if "num" in key else "3")
            )
    for key in ("budget_tokens", "max_concurrent", "max_failures", "grace_tokens"):
        if getattr(t, key) < 0:
            _fail(f"tune.{key}={getattr(t, key)} must not be negative; set tune.{key}=0 for the default")
    if any(not isinstance(m, int) or m <= 0 for m in t.rung_tokens):
        _fail(f"tune.rung_tokens={t.rung_tokens} must be positive token counts; leave it to raylm sweep")


def _check_data(cfg: Config) -> None:
    for pattern in cfg.data.paths:
        if not isinstance(pattern, str) or not pattern or "\0" in pattern:
            _fail(
                f"data.paths entry {short_repr(pattern)} must be a non-empty string path or glob, or {SUPPORTED}"
            )
        if is_uri(pattern):
            continue  # checked by _check_storage; its objects are listed when prepare runs
        expanded = os.path.expanduser(pattern)
        if not (os.path.exists(expanded) or glob.glob(expanded, recursive=True)):
            _fail(f"data.paths entry {pattern!r} matches no file or folder; fix the path or glob")
    for source in cfg.data.sources:
        if not isinstance(source, dict) or not isinstance(source.get("path"), str) or not source["path"]:
            _fail(
                f"data.sources entry {short_repr(source)} must be a mapping with a path string (and weight); "
                f"e.g. {{path: data/code, weight: 1.0}}"
            )
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            _fail(
                f"data.sources weight {short_repr(weight)} for {source['path']} must be a positive finite number"
            )


def _check_drill(cfg: Config) -> None:
    drill = cfg.fault.drill
    if drill and not DRILL.match(drill):
        _fail(
            f"fault.drill={drill!r} is not PHASE@STEP[:RANK][,...] with PHASE one of {', '.join(PHASES)}; "
            f"e.g. fault.drill=mid-files@4 or step@3:1,after-commit@6:2, or '' for no drill"
        )
    world = worker_range(cfg)[0]  # an elastic group may shrink to its fewest workers
    for _, _, rank in parse_drills(drill, cfg.fault.drill_rank):
        if not 0 <= rank < world:
            _fail(
                f"fault.drill rank {rank} (fault.drill_rank or :RANK) is not a rank of the {world} workers; "
                f"set it below {world}"
            )


def _check_trackers(cfg: Config) -> None:
    trackers = cfg.run.trackers
    for name in trackers:
        if name not in TRACKERS:
            _fail(
                f"run.trackers entry {short_repr(name)} is not one of {', '.join(TRACKERS)}; "
                f"e.g. run.trackers='[tensorboard, mlflow]'"
            )
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            _fail(
                f"run.trackers has {name} but the {name} package is not installed: pip install 'raylm[track]'"
            )
    if len(set(trackers)) != len(trackers):
        _fail(f"run.trackers={trackers} names a tracker twice; name each once")


def _check_profile(cfg: Config) -> None:
    steps = cfg.train.profile_steps
    if not steps:
        return
    last = cfg.train.max_steps - 1
    ints = len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
    if not ints or not 0 <= steps[0] <= steps[1] <= last:
        _fail(
            f"train.profile_steps={short_repr(steps)} must be [START, END] with 0 <= START <= END <= "
            f"{last} (train.max_steps - 1); e.g. train.profile_steps='[{min(2, last)}, {min(3, last)}]'"
        )
