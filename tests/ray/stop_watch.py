"""Watch a running sweep: within 30 s of each ASHA stop, nothing of that trial may be left in Ray's state API.

While trials run, the watch notes which live Ray Train actors belong to which trial: a Train worker by its working
directory (Ray Train runs it in a folder named after the run, and a trial's run is named after the trial), the
TrainController by the placement group of the trial's Tune actor (trial.json's actor_id), which Tune makes its
children's. After a stop, the trial's controller and workers must be dead, their placement groups removed and
their processes gone (each worker's Ray Data streaming executor is a thread in that process). A one-worker trial
trains in its Tune actor (raylm.tune.trial_actor), which Tune reuses for the next trial: there, after a stop, the
trial's metrics.jsonl must stop growing (unchanged from 5 s to 10 s after the stop; its loop reports every step)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

WORKER, CONTROLLER = "RayTrainWorker", "TrainController"


def working_dir_name(pid: int) -> str:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).name
    except OSError:
        return ""


class StopWatch(threading.Thread):
    """Polls while the sweep runs; `checked` maps each stopped trial to the seconds until nothing of it was left,
    `late` to what was still there 30 s after its stop, `owned` to the actors noted for it (id -> state)."""

    def __init__(self, sweep_dir: Path, limit_s: float = 30.0):
        super().__init__(daemon=True)
        self.sweep_dir, self.limit_s = sweep_dir, limit_s
        self.pending: dict[str, float] = {}
        self.checked: dict[str, float] = {}
        self.late: dict[str, list[str]] = {}
        self.owned: dict[str, dict] = {}
        # the state API asks this cluster's GCS (left to itself it refuses when the machine runs two Rays)
        import ray

        self.address = ray.get_runtime_context().gcs_address
        self.quiet_since: dict[str, int] = {}  # in-actor trial -> its metrics.jsonl size 5 s after its stop
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while True:
                finishing = (
                    self.done.is_set()
                )  # read first: a stop written just before the end is still noted
                self._note_new_stops()
                self._note_live_actors()
                for trial, stopped_at in list(self.pending.items()):
                    left = (
                        self.leftovers(trial)
                        if trial in self.owned
                        else self.still_training(trial, stopped_at)
                    )
                    if not left:
                        self.checked[trial] = time.time() - stopped_at
                        del self.pending[trial]
                    elif time.time() - stopped_at > self.limit_s:
                        self.late[trial] = left
                        del self.pending[trial]
                if finishing and not self.pending:
                    return
                time.sleep(0.5)
        except BaseException as exc:  # re-raised by finish() in the test's thread
            self.error = exc

    def _tune_actors(self) -> dict[str, str]:
        """Trial id -> the Tune actor running it, from the trials' trial.json."""
        found = {}
        for path in (self.sweep_dir / "trials").glob("*/trial.json"):
            try:
                found[path.parent.name] = json.loads(path.read_text())["actor_id"]
            except (OSError, ValueError, KeyError):
                continue  # being written
        return found

    def _note_live_actors(self) -> None:
        from ray.util.state import list_actors

        tune_actors = self._tune_actors()
        alive = {
            a.actor_id: a
            for a in list_actors(
                address=self.address,
                filters=[("state", "=", "ALIVE")],
                detail=True,
                limit=10_000,
                raise_on_missing_output=False,
            )
        }
        trial_of_group = {
            alive[actor].placement_group_id: trial
            for trial, actor in tune_actors.items()
            if actor in alive and alive[actor].placement_group_id
        }
        for actor in alive.values():
            if actor.class_name == WORKER:
                trial = working_dir_name(actor.pid)
            elif actor.class_name == CONTROLLER:
                trial = trial_of_group.get(actor.placement_group_id, "")
            else:
                continue
            if trial in tune_actors:
                self.owned.setdefault(trial, {})[actor.actor_id] = actor

    def _note_new_stops(self) -> None:
        path = self.sweep_dir / "decisions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for row in rows:
            seen = row["trial"] in self.pending or row["trial"] in self.checked or row["trial"] in self.late
            if row["action"] == "stop" and not seen:
                self.pending[row["trial"]] = time.time()

    def leftovers(self, trial: str) -> list[str]:
        """What of the trial's noted actors is still there: live actors, placement groups, processes."""
        from ray.util.state import list_actors, list_placement_groups

        owned = self.owned.get(trial, {})
        now = {
            a.actor_id: a
            for a in list_actors(
                address=self.address, detail=True, limit=10_000, raise_on_missing_output=False
            )
        }
        left = [
            f"actor {a.class_name} {a.actor_id}"
            for a in owned.values()
            if a.actor_id in now and now[a.actor_id].state != "DEAD"
        ]
        groups = {
            a.placement_group_id for a in owned.values() if a.placement_group_id and a.class_name == WORKER
        }
        left += [
            f"placement group {g.placement_group_id}"
            for g in list_placement_groups(address=self.address, limit=10_000)
            if g.placement_group_id in groups and g.state != "REMOVED"
        ]
        left += [
            f"process {a.pid} of {a.class_name} (its Ray Data executor)"
            for a in owned.values()
            if a.class_name == WORKER
            and os.path.exists(f"/proc/{a.pid}")
            and working_dir_name(a.pid) == trial
        ]
        return left

    def still_training(self, trial: str, stopped_at: float) -> list[str]:
        """For a trial trained in its Tune actor: whether its loop still writes steps after the stop."""
        metrics = self.sweep_dir / "trials" / trial / "metrics.jsonl"
        size = metrics.stat().st_size if metrics.exists() else 0
        since = time.time() - stopped_at
        if since < 5:
            return ["(waiting 5 s after the stop)"]
        if trial not in self.quiet_since:
            self.quiet_since[trial] = size
        if size != self.quiet_since[trial]:
            return [
                f"its loop: metrics.jsonl grew from {self.quiet_since[trial]} to {size} bytes after the stop"
            ]
        return [] if since >= 10 else ["(watching metrics.jsonl until 10 s after the stop)"]

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=self.limit_s + 30)
        if self.error is not None:
            raise self.error
