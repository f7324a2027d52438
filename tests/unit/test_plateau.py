"""The plateau lr schedule from a table of validation losses, and the same sequence across a resume."""

from dataclasses import asdict

import pytest

from raylm.config.schema import LrScheduleConfig
from raylm.train.schedule import PlateauState, lr_at, plateau_after_eval

SCHED = LrScheduleConfig(
    kind="plateau", warmup_steps=10, min_lr_frac=0.2, factor=0.5, patience=2, threshold=0.01
)
# (step of the evaluation, val_loss, lr scale after it)
TABLE = [
    (10, 9.0, 1.0),  # during warmup: ignored
    (20, 5.0, 1.0),
    (30, 4.0, 1.0),
    (40, 3.99, 1.0),
    (50, 3.98, 0.5),  # 3.99 and 3.98 are < 1% better
    (60, 3.0, 0.5),
    (70, float("nan"), 0.5),
    (80, 3.5, 0.25),
    (90, 3.4, 0.25),
    (100, 3.3, 0.2),  # floor 0.2
    (110, 3.2, 0.2),
    (120, 2.0, 0.2),
]


def run(table, state=None):
    state = state or PlateauState()
    scales = []
    for step, val_loss, _ in table:
        state = plateau_after_eval(state, val_loss, step, SCHED)
        scales.append(state.scale)
    return state, scales


def test_plateau_table():
    _, scales = run(TABLE)
    assert scales == [expected for _, _, expected in TABLE]


def test_plateau_lr_follows_the_scale_after_warmup():
    assert lr_at(4, 1.0, 100, SCHED, plateau_scale=0.5) == pytest.approx(0.5)  # warmup: 5/10 of the peak
    assert lr_at(50, 2.0, 100, SCHED, plateau_scale=0.25) == pytest.approx(0.5)


@pytest.mark.parametrize("cut", range(1, len(TABLE)))
def test_a_resume_at_any_evaluation_gives_the_same_sequence(cut):
    """The state goes through the checkpoint's trainer_state as JSON-able data."""
    _, whole = run(TABLE)
    state, first = run(TABLE[:cut])
    restored = PlateauState(**asdict(state))
    _, rest = run(TABLE[cut:], restored)
    assert first + rest == whole


def test_other_kinds_never_change_the_state():
    cosine = LrScheduleConfig(kind="cosine")
    assert plateau_after_eval(PlateauState(), 1.0, 100, cosine) == PlateauState()
