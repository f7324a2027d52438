"""A run's small files (metrics.jsonl, TensorBoard events, tracker records, loss.png, placement) written in a local
folder and, for a run on object storage, copied to its prefix: rank 0 at every report and at the end, so the prefix
holds the whole run; a resumed run first takes metrics.jsonl and the tracker records back from the prefix
(docs/storage.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

from raylm.storage.file_names import LOSS_PLOT_FILE, METRICS_FILE
from raylm.storage.location import Location, file_sizes, is_remote, local_view, put_file, read_bytes
from raylm.train.tracking.ids import RECORDED, TRACKER_FOLDER, record_name

SYNCED = (
    METRICS_FILE,
    LOSS_PLOT_FILE,
    "tensorboard/",
    f"{TRACKER_FOLDER}/",
)  # files, or folders ending in '/'


class RunFiles:
    """The local folder a rank writes the run's small files into (`local`), and their copy on the run's storage.

    For a run folder both are the same folder and pull/push do nothing."""

    def __init__(self, run: Location, cache_dir: str = ""):
        self.run = run
        self.local: Path = local_view(run, cache_dir)
        self._sent: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) last uploaded

    def pull(self, name: str) -> None:
        """Replace the local copy of `name` by the prefix's, the run's record (none there: no local copy either,
        so an earlier run of the same prefix on this machine leaves nothing behind)."""
        if not is_remote(self.run):
            return
        data = read_bytes(self.run / name)
        target = self.local / name
        if data is None:
            target.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def start(self) -> None:
        """Rank 0 before its first row: drop this machine's copies of the synced files and take the prefix's
        metrics.jsonl and tracker records (a resumed run keeps its rows and tracker runs, a fresh one starts
        empty)."""
        if not is_remote(self.run):
            return
        for name in SYNCED:
            if name.endswith("/"):
                shutil.rmtree(self.local / name, ignore_errors=True)
        for name in (METRICS_FILE, *map(record_name, RECORDED)):
            self.pull(name)

    def push(self, names: tuple[str, ...] = SYNCED) -> list[str]:
        """Upload the named local files (a name ending in '/' is every file under that folder) that changed since
        the last push; returns the names uploaded."""
        if not is_remote(self.run):
            return []
        sent = []
        for name in self._expand(names):
            stat = (self.local / name).stat()
            mark = (stat.st_size, stat.st_mtime_ns)
            if self._sent.get(name) != mark:
                put_file(self.local / name, self.run / name)
                self._sent[name] = mark
                sent.append(name)
        return sent

    def _expand(self, names: tuple[str, ...]) -> list[str]:
        found = []
        for name in names:
            if name.endswith("/"):
                found += [f"{name}{rel}" for rel in sorted(file_sizes(self.local / name.rstrip("/")))]
            elif (self.local / name).is_file():
                found.append(name)
        return found
