"""Watch a running sweep: within 30 s of each ASHA stop, nothing of that trial may be left in Ray's state API.

A trial's things are found from the Tune actor that ran it (trial.json's actor_id) down the task tree: the tasks
of an owned actor, the actors and tasks those tasks created (Ray Train's controller, its workers, the workers'
Ray Data read tasks), and the placement groups of the owned actors other than the Tune actor (Tune's own group
may be reused for the next trial)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

LIVE_TASK_STATES = {"PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER", "RUNNING",
                    "PENDING_OBJ_STORE_MEM_AVAIL", "PENDING_ACTOR_TASK_ARGS_FETCH",
                    "PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY"}


def trial_leftovers(tune_actor: str) -> tuple[set[str], list[str]]:
    """(class names of the actors the trial created, what of the trial is still alive: actors, placement groups,
    tasks) for the trial run by `tune_actor`."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    tasks = list_tasks(detail=True, limit=100_000, raise_on_missing_output=False)
    actors, owned_tasks = {tune_actor}, set()
    grew = True
    while grew:
        before = (len(actors), len(owned_tasks))
        for task in tasks:
            if task.actor_id in actors or task.parent_task_id in owned_tasks:
                owned_tasks.add(task.task_id)
                if task.actor_id:
                    actors.add(task.actor_id)
        grew = (len(actors), len(owned_tasks)) != before
    actors.discard(tune_actor)
    states = {a.actor_id: a for a in list_actors(detail=True, limit=100_000, raise_on_missing_output=False)}
    left = [f"actor {states[a].class_name} {a}" for a in actors if a in states and states[a].state != "DEAD"]
    groups = {states[a].placement_group_id for a in actors if a in states and states[a].placement_group_id}
    left += [f"placement group {g.placement_group_id}" for g in list_placement_groups(limit=100_000)
             if g.placement_group_id in groups and g.state != "REMOVED"]
    left += [f"task {t.name} {t.task_id}" for t in tasks if t.task_id in owned_tasks and t.actor_id is None
             and t.state in LIVE_TASK_STATES]
    return {states[a].class_name for a in actors if a in states}, left


class StopWatch(threading.Thread):
    """Polls decisions.jsonl while the sweep runs; `checked` maps each stopped trial to the seconds until nothing
    of it was left, `late` to what was still there 30 s after its stop, `created` to its actors' classes."""

    def __init__(self, sweep_dir: Path, limit_s: float = 30.0):
        super().__init__(daemon=True)
        self.sweep_dir, self.limit_s = sweep_dir, limit_s
        self.pending: dict[str, float] = {}
        self.checked: dict[str, float] = {}
        self.late: dict[str, list[str]] = {}
        self.created: dict[str, set[str]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not (self.done.is_set() and not self.pending):
            self._note_new_stops()
            for trial, stopped_at in list(self.pending.items()):
                actor = json.loads((self.sweep_dir / "trials" / trial / "trial.json").read_text())["actor_id"]
                self.created[trial], left = trial_leftovers(actor)
                if not left:
                    self.checked[trial] = time.time() - stopped_at
                    del self.pending[trial]
                elif time.time() - stopped_at > self.limit_s:
                    self.late[trial] = left
                    del self.pending[trial]
            time.sleep(0.5)

    def _note_new_stops(self) -> None:
        path = self.sweep_dir / "decisions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for row in rows:
            seen = row["trial"] in self.pending or row["trial"] in self.checked or row["trial"] in self.late
            if row["action"] == "stop" and not seen:
                self.pending[row["trial"]] = time.time()

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=self.limit_s + 30)
