"""Where the training loop hands its results: Ray Train (reports, committed checkpoints), or nowhere else."""

from __future__ import annotations

import os
from typing import Any

from raylm.storage.location import Location, is_remote


class Reporter:
    """What the loop asks of whatever runs its ranks: take a metrics row every few steps, or a row with the
    checkpoint just committed (every rank calls it together; rank 0 passes the folder, the others None),
    and say how many workers share this node (threads, peak FLOP/s). The loop itself never imports Ray."""

    def report(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def report_checkpoint(self, row: dict[str, Any], path: Location | None) -> None:
        raise NotImplementedError

    def workers_per_node(self) -> int:
        raise NotImplementedError


class RayTrainReporter(Reporter):
    """Inside a Ray Train worker: ray.train.report, which blocks until the controller's next poll (~2 s by
    default: the loop reports at checkpoints, evaluations and every train.report_every steps)."""

    def report(self, row: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(row)

    def report_checkpoint(self, row: dict[str, Any], path: Location | None) -> None:
        """ray.train.report with the committed folder, which already sits in the run folder (or prefix, on Ray
        Train's own storage filesystem): nothing is copied."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = None
        if path is not None and is_remote(path):
            storage = ray.train.get_context().get_storage()  # the filesystem RunConfig was given
            checkpoint = ray.train.Checkpoint(path=path.path, filesystem=storage.storage_filesystem)
        elif path is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report(row, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def workers_per_node(self) -> int:
        import ray.train

        return ray.train.get_context().get_local_world_size()


class PlainReporter(Reporter):
    """Ranks in plain processes (torch.distributed started by their launcher, no Ray): the run's record is its
    own files (metrics.jsonl, the committed checkpoints), so a report is only kept here, newest last."""

    def __init__(self, workers_per_node: int | None = None):
        self._workers_per_node = workers_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.reports: list[tuple[dict[str, Any], Location | None]] = []

    def report(self, row: dict[str, Any]) -> None:
        self.reports.append((row, None))

    def report_checkpoint(self, row: dict[str, Any], path: Location | None) -> None:
        self.reports.append((row, path))

    def workers_per_node(self) -> int:
        return self._workers_per_node
