"""Tune benchmark: a 9-trial grid (3 lrs x cosine/wsd/linear) run to the full budget (FIFO), then under ASHA.

Run `python benchmarks/tune.py` (a 0.3M-parameter model on a dozen standard-library modules, 432 steps of 8 x 32
tokens per trial, about 7 minutes on 2 cores, mostly trial start-up); `--steps N` sets the steps per trial (the
rungs, at budget / 9 and budget / 3, move with it). At 144 steps the first rung falls 11 steps after warm-up, while
every trial is still learning unigram statistics: there lr 1e-2 leads 3e-3 by 0.012 nats of val_loss, and trails it
by 0.3 at the end, so ASHA stopped the eventual winner (measured with the stopping rule raylm used before: gap 0.072).

Prints one JSON object: asha_budget_frac (ASHA's tokens / the full grid's, target <= 0.45; successive halving of 9
trials at rf 3 gives 21/81 = 0.259 whatever the arrival order), asha_wall_frac (wall seconds, the same ratio, target <=
0.55: each promotion of a paused trial restarts it, which costs a start-up), trial_start_s (the median over every
start of a trial, both sweeps, from its launch to its first batch in hand, target <= 8; an actor's first trial
counts from its process start, which Ray may have started earlier for its pool), asha_stop_overshoot_tokens (the
most tokens a stopped trial trained past the report ASHA stopped it at), asha_best_loss_gap (relative final
val_loss of ASHA's best against the full grid's best, target <= 0.01; asha_best_in_top2 says whether ASHA's best is
among the full grid's top 2), asha_replay_agree (trials on which ASHA replayed offline on the full grid's curves,
fed the arrivals in the order ASHA judged them, reaches the same outcome; target >= 8/9).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from common import REPO_ROOT, TINY, emit, ensure_prepared, scratch_dir

from raylm.config import load_config
from raylm.train.startup import read_startups
from raylm.tune.asha import AT_CLOSE, AT_REPORT, RungBook, read_decisions

SPACE = "optim.lr: {grid: [3.0e-3, 1.0e-2, 3.0e-2]}\nschedule.lr.kind: {grid: [cosine, wsd, linear]}\n"
MODEL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.max_seq_len=64",
    "data.vocab_size=512",
    "data.seq_len=32",
    "parallel.pp=1",
    "parallel.zero_stage=0",
    "parallel.micro_batch=4",
    "train.global_batch=8",
    "train.eval_every=0",
    "schedule.lr.warmup_steps=5",
    "checkpoint.every_steps=0",
    # Validation: 10% of the corpus in 4 KB pieces (whole modules would hold out one 1.5k-token file), and
    # 256 samples (8192 tokens) of it at every rung, the same for every trial.
    "data.val_fraction=0.1",
    "data.max_doc_bytes=4096",
    "train.eval_samples=256",
]
STEP_TOKENS = 8 * 32  # train.global_batch x data.seq_len below
STDLIB_FILES = (
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "string.py",
    "textwrap.py",
    "typing.py",
    "heapq.py",
    "bisect.py",
    "random.py",
)


def small_corpus(folder: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in STDLIB_FILES:
        if (stdlib / name).exists():
            shutil.copy(stdlib / name, folder / name.replace("/", "_"))
    return folder


def run_sweep(work: Path, scheduler: str, budget: int) -> tuple[list[dict], list[dict], float]:
    """(trials.jsonl rows, decisions.jsonl rows, wall seconds) of one sweep over SPACE."""
    from raylm.tune.sweep import sweep

    cfg = load_config(
        TINY,
        MODEL
        + [
            f"data.paths=['{work / 'corpus'}']",
            f"data.out_dir={work / 'data'}",
            f"run.dir={work / 'runs'}",
            f"tune.name={scheduler}",
            "tune.num_samples=1",
            f"tune.budget_tokens={budget}",
            f"tune.scheduler={scheduler}",
        ],
    )
    ensure_prepared(cfg)
    start = time.time()
    summary = sweep(cfg, work / "space.yaml", overwrite=True)
    wall_s = time.time() - start
    sweep_dir = Path(summary["sweep_dir"])
    trials = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    return trials, read_decisions(sweep_dir / "decisions.jsonl"), wall_s


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def replay(full: list[dict], asha: list[dict], asha_decisions: list[dict], milestones: list[int]) -> int:
    """ASHA offline on the full grid's rung values, fed the arrivals in the order the live ASHA judged them, and
    closing its book where the live one closed: the number of trials whose outcome (stopped at rung k, or never
    stopped) matches the live run's."""
    value_at = {(key(t["params"]), int(rung)): value for t in full for rung, value in t["rungs"].items()}
    params_of = {t["trial_id"]: key(t["params"]) for t in asha}
    book, replayed, from_close = RungBook(milestones, reduction_factor=3, total_trials=len(asha)), [], set()
    for d in asha_decisions:
        if d["event"] == AT_REPORT:
            replayed += book.arrive(
                d["trial"], d["tokens"], value_at[(params_of[d["trial"]], d["milestone_tokens"])]
            )
        elif d["event"] == AT_CLOSE and (d["trial"], d["rung"], d["action"]) not in from_close:
            closed = book.close()
            from_close |= {(c.trial, c.rung, c.action) for c in closed}
            replayed += closed
    stopped_at = {d.trial: d.rung for d in replayed if d.action == "stop"}
    live = {d["trial"]: d["rung"] for d in asha_decisions if d["action"] == "stop"}
    return sum(stopped_at.get(t["trial_id"]) == live.get(t["trial_id"]) for t in asha)


def stop_overshoot(trials: list[dict], decisions: list[dict]) -> int:
    """The most tokens a stopped trial trained past the report ASHA stopped it at (0: it ended at that report)."""
    stop_tokens = {d["trial"]: d["tokens"] for d in decisions if d["action"] == "stop"}
    return max(
        (t["tokens"] - stop_tokens[t["trial_id"]] for t in trials if t["trial_id"] in stop_tokens), default=0
    )


def trial_starts(trials: list[dict]) -> list[float]:
    """Seconds from each start of a trial (its launch, or a promotion's restart) to its first batch, from the
    trials' startup.jsonl rows (raylm.train.startup)."""
    rows = [row["marks"] for t in trials for row in read_startups(Path(t["folder"]))]
    return [marks["first_batch"] - marks["launched"] for marks in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=432, help="steps of 8 x 32 tokens every trial trains")
    budget = parser.parse_args().steps * STEP_TOKENS
    work = scratch_dir("raylm-bench-tune-")
    small_corpus(work / "corpus")
    (work / "space.yaml").write_text(SPACE)
    stdout = os.dup(1)
    os.dup2(2, 1)  # Tune's live tables go to stderr: stdout carries the one JSON line
    try:
        full, _, full_wall_s = run_sweep(work, "fifo", budget)
        asha, asha_decisions, asha_wall_s = run_sweep(work, "asha", budget)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    milestones = sorted({d["milestone_tokens"] for d in asha_decisions})
    starts = trial_starts(full) + trial_starts(asha)
    ranked = sorted((t for t in full if t["last"] is not None), key=lambda t: t["last"])
    asha_best = min((t for t in asha if t["status"] == "finished"), key=lambda t: t["last"])
    full_best = ranked[0]["last"]
    emit(
        benchmark="tune",
        trials=len(full),
        budget_tokens=budget,
        milestones_tokens=milestones,
        asha_budget_frac=round(sum(t["tokens"] for t in asha) / sum(t["tokens"] for t in full), 4),
        asha_wall_frac=round(asha_wall_s / full_wall_s, 4),
        full_wall_s=round(full_wall_s, 1),
        asha_wall_s=round(asha_wall_s, 1),
        asha_best_loss_gap=round((asha_best["last"] - full_best) / full_best, 5),
        asha_best_in_top2=key(asha_best["params"]) in {key(t["params"]) for t in ranked[:2]},
        asha_stopped=sum(t["status"] == "stopped" for t in asha),
        trial_start_s=round(statistics.median(starts), 2),
        trial_starts=len(starts),
        asha_stop_overshoot_tokens=stop_overshoot(asha, asha_decisions),
        full_top2=[{**t["params"], "val_loss": round(t["last"], 4)} for t in ranked[:2]],
        asha_best={**asha_best["params"], "val_loss": round(asha_best["last"], 4)},
        asha_replay_agree=f"{replay(full, asha, asha_decisions, milestones)}/{len(asha)}",
        work_dir=str(work),
        repo=str(REPO_ROOT),
    )


if __name__ == "__main__":
    main()
