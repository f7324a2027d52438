"""Population-based training at token rungs (pure): who exploits whom, the perturbed config, the learned lr path.

At each rung a trial whose value is in the worst `quantile` of those recorded there takes the config of the best
trial at that rung with optim.lr perturbed (and each searched batch-schedule key moved to a neighbouring value of
its space), and restarts from that donor's committed rung checkpoint: schedules may change on resume."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EXPLOIT_KEY = "__exploit"  # in a trial's Tune config after an exploit: {n, donor, checkpoint, tokens}
LR_FACTORS = (0.8, 1.25)
PATH_KEYS = ("tokens", "lr", "batch_size")  # of each metrics row, in best_lr_path.jsonl
BATCH_KEYS = (
    "train.global_batch",
    "schedule.batch.start",
    "schedule.batch.increment",
    "schedule.batch.ramp_tokens",
)


@dataclass
class PbtBook:
    milestones_tokens: list[int]
    quantile: float = 0.25
    seed: int = 0
    space: dict = field(default_factory=dict)  # the space file's raw mapping: where a batch key may move
    recorded: dict[int, dict[str, dict]] = field(
        default_factory=dict
    )  # rung -> trial -> {value, checkpoint, config}
    exploits: int = 0

    def decide(
        self,
        trial: str,
        tokens: int,
        value: float,
        checkpoint: str | None,
        config: dict,
        alive: set[str] | frozenset = frozenset(),
    ) -> list[dict]:
        """Record the trial at the highest rung it reached, then return the exploits this makes due: every trial
        recorded at that rung (the arriving one, or one of the `alive` ones that arrived earlier) whose value is in
        the worst quantile there takes the best trial's config and rung checkpoint, once per rung."""
        reached = [k for k, m in enumerate(self.milestones_tokens) if tokens >= m]
        if not reached or trial in self.recorded.get(reached[-1], {}):
            return []
        rung = reached[-1]
        at_rung = self.recorded.setdefault(rung, {})
        at_rung[trial] = {"value": value, "checkpoint": checkpoint, "config": config, "tokens": tokens}
        donors = [(entry["value"], name) for name, entry in at_rung.items() if entry["checkpoint"]]
        if len(at_rung) < 2 or not donors:
            return []
        best_value, donor = min(donors)
        worst = np.percentile([entry["value"] for entry in at_rung.values()], 100 * (1 - self.quantile))
        exploits = []
        for name, entry in at_rung.items():
            due = entry["value"] >= worst and entry["value"] > best_value and not entry.get("exploited")
            if due and (name == trial or name in alive):
                entry["exploited"] = True
                self.exploits += 1
                exploits.append(
                    {
                        "trial": name,
                        "rung": rung,
                        "donor": donor,
                        "value": entry["value"],
                        "checkpoint": at_rung[donor]["checkpoint"],
                        "tokens": at_rung[donor]["tokens"],
                        "config": self.perturb(at_rung[donor]["config"]),
                        "n": self.exploits,
                    }
                )
        return exploits

    def perturb(self, donor_config: dict) -> dict:
        """The donor's sampled values with optim.lr multiplied by 0.8 or 1.25 and each searched batch-schedule key
        moved one value along its list (or x0.8 / x1.25 within its range); drawn from seed and exploit count."""
        config = {key: value for key, value in donor_config.items() if key != EXPLOIT_KEY}
        draw = random.Random(self.seed + self.exploits)  # noqa: S311 - a seeded search, not a secret
        if "optim.lr" in config:
            config["optim.lr"] = config["optim.lr"] * draw.choice(LR_FACTORS)
        for key in BATCH_KEYS:
            if key in config and isinstance(self.space.get(key), dict):
                config[key] = neighbour(self.space[key], config[key], draw)
        return config


def neighbour(spec: dict, value: Any, draw: random.Random) -> Any:
    """A value next to `value` in its distribution: the previous or next listed value (choice/grid), or value x0.8
    or x1.25 kept inside a range (integers for randint)."""
    for kind in ("choice", "grid"):
        if kind in spec:
            values = list(spec[kind])
            if value not in values or len(values) < 2:
                return value
            index = values.index(value) + draw.choice((-1, 1))
            return values[index if 0 <= index < len(values) else values.index(value) * 2 - index]
    for kind in ("uniform", "loguniform", "randint"):
        if kind in spec:
            low, high = spec[kind]
            moved = min(max(value * draw.choice(LR_FACTORS), low), high)
            return min(round(moved), high - 1) if kind == "randint" else moved
    return value


def split_exploit(params: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """A trial's sampled values, and the exploit its config carries (None before any)."""
    return {k: v for k, v in params.items() if k != EXPLOIT_KEY}, params.get(EXPLOIT_KEY)


def lr_path(trial: str, rows_of: dict[str, list[dict]], exploits: list[dict]) -> list[dict]:
    """The lr-vs-tokens path (with the batch size) the trial's final weights actually followed: its donors' rows up
    to each exploit, then its own. `exploits` are the decisions (trial, donor, tokens) in the order they happened."""
    own = [{key: r[key] for key in PATH_KEYS if key in r} for r in rows_of.get(trial, [])]
    mine = [e for e in exploits if e["trial"] == trial]
    if not mine:
        return own
    last = mine[-1]
    earlier = exploits[: exploits.index(last)]  # the donor's history as it stood when it was copied
    before = [p for p in lr_path(last["donor"], rows_of, earlier) if p["tokens"] <= last["tokens"]]
    return before + [p for p in own if p["tokens"] > last["tokens"]]
