"""parallel.layout=auto and checkpoint.every_steps=auto in a real TorchTrainer on a local Ray: the planner picks
the layout for the workers the run gets, and Young/Daly's interval (from the first save's measured time) sets
which steps commit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylm.checkpoint.commit import list_committed
from raylm.train.driver import train
from raylm.train.metrics import read_metrics
from raylm.train.run_folder import checkpoint_root


def committed_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in list_committed(checkpoint_root(run)))


# slow since make test passed 15 minutes (45 s here); make test keeps choose_layout and the Young/Daly interval
# in tests/unit/test_plan_decide.py
@pytest.mark.slow
def test_layout_auto_and_every_steps_auto_train_and_checkpoint_by_young_daly(ray_cluster, small_config):
    autos = (
        "parallel.layout=auto",
        "parallel.num_workers=2",
        "checkpoint.every_steps=auto",
        "checkpoint.keep=2",
    )
    # a job MTBF of 36 microseconds: Young/Daly's interval is far shorter than a step, so every step saves
    cfg = small_config("autos", *autos, "fault.mtbf_hours=1e-8")
    summary = train(cfg)
    run = Path(cfg.run.dir) / cfg.run.name
    saved = yaml.safe_load((run / "config.yaml").read_text())["parallel"]
    assert saved["layout"] == "auto" and saved["pp"] * saved["tp"] * saved["dp"] == 2
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and {r["dp"] for r in rows} == {saved["dp"]}
    assert summary["predicted_tokens_per_s"] > 0
    assert committed_steps(run) == [3, 4]  # saved at every step, the newest two kept

    # a long MTBF: the first step's save (the measurement) and the last step's, nothing between
    cfg = small_config("autos-long", *autos, "fault.mtbf_hours=1e6")
    train(cfg)
    assert committed_steps(Path(cfg.run.dir) / cfg.run.name) == [1, 4]
