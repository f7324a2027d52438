"""Schedules are pure functions of the step, checked against tables."""

import pytest

from raylm.config.schema import BatchScheduleConfig, LrScheduleConfig, SeqLenScheduleConfig
from raylm.train.schedule import batch_size_at, lr_at, seq_len_at


@pytest.mark.parametrize(
    "kind, step, expected",
    [
        ("constant", 0, 0.25),
        ("constant", 3, 1.0),
        ("constant", 99, 1.0),
        ("linear", 4, 1.0),
        ("linear", 52, 0.55),
        ("linear", 100, 0.1),
        ("cosine", 4, 1.0),
        ("cosine", 52, 0.55),
        ("cosine", 100, 0.1),
        ("cosine", 28, 0.1 + 0.9 * 0.853553390593),
        ("wsd", 3, 1.0),
        ("wsd", 79, 1.0),
        ("wsd", 80, 0.1 + 0.9 * 0.95),
        ("wsd", 99, 0.1),
        ("wsd", 150, 0.1),
    ],
)
def test_lr_table(kind, step, expected):
    sched = LrScheduleConfig(kind=kind, warmup_steps=4, min_lr_frac=0.1, decay_frac=0.2, decay_shape="linear")
    assert lr_at(step, 1.0, 100, sched) == pytest.approx(expected)


@pytest.mark.parametrize(
    "shape, step, expected",
    [
        ("linear", 89, 0.1 + 0.9 * 0.5),
        ("cosine", 89, 0.1 + 0.9 * 0.5),
        ("sqrt", 89, 0.1 + 0.9 * (1 - 0.5**0.5)),
    ],
)
def test_wsd_decay_shapes(shape, step, expected):
    sched = LrScheduleConfig(kind="wsd", warmup_steps=0, min_lr_frac=0.1, decay_frac=0.2, decay_shape=shape)
    assert lr_at(step, 1.0, 100, sched) == pytest.approx(expected)


@pytest.mark.parametrize("tokens, expected", [(0, 8), (99, 8), (100, 16), (250, 24), (300, 32), (10**9, 32)])
def test_batch_ramp_table(tokens, expected):
    # from 8 to 32 in steps of 8: three stages over 300 tokens, 100 tokens each
    sched = BatchScheduleConfig(start=8, increment=8, ramp_tokens=300)
    assert batch_size_at(tokens, 32, sched) == expected


def test_no_ramp_means_the_final_batch():
    assert batch_size_at(0, 16, BatchScheduleConfig()) == 16


@pytest.mark.parametrize(
    "step, expected",
    [(0, 256), (3, 256), (4, 512), (7, 512), (8, 1024), (11, 1024), (12, 2048), (10**6, 2048)],
)
def test_seq_len_warmup_table(step, expected):
    # from 256 to 2048: three doublings over 12 steps, at steps 4, 8 and 12
    assert seq_len_at(step, 2048, SeqLenScheduleConfig(start=256, warmup_steps=12)) == expected


@pytest.mark.parametrize("step, expected", [(0, 8), (4, 8), (5, 16), (9, 16), (10, 32)])
def test_seq_len_doublings_fall_at_the_ceiling_of_equal_shares(step, expected):
    # two doublings over 10 steps: at ceil(10 / 2) = 5 and 10
    assert seq_len_at(step, 32, SeqLenScheduleConfig(start=8, warmup_steps=10)) == expected


def test_no_seq_len_warmup_means_the_final_length():
    assert seq_len_at(0, 128, SeqLenScheduleConfig()) == 128
    assert seq_len_at(0, 128, SeqLenScheduleConfig(start=128, warmup_steps=5)) == 128
