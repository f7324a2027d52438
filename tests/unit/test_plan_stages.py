"""The planner cuts pipeline stages as DeepSpeed's pipeline does, and counts each stage's parameters."""

import pytest

from raylm.config import load_config
from raylm.plan.stages import model_shape, partition_balanced, partition_uniform, stage_bounds, stages
from tests.conftest import TINY_CONFIG

GPT2_SMALL = TINY_CONFIG.parent / "gpt2-small.yaml"


@pytest.mark.parametrize(
    "weights,parts",
    [
        ([0, 5, 5, 5, 5, 0, 9], 2),
        ([0, 5, 5, 5, 5, 0, 9], 4),
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 3),
        ([1] * 7, 7),
        ([2, 2], 4),
        ([0] + [7] * 80 + [0, 50], 8),
    ],
)
def test_balanced_and_uniform_partitions_are_deepspeeds(weights, parts):
    from deepspeed.runtime.utils import partition_balanced as ds_balanced
    from deepspeed.runtime.utils import partition_uniform as ds_uniform

    assert partition_balanced(weights, parts) == [int(x) for x in ds_balanced(weights, parts)]
    assert partition_uniform(len(weights), parts) == [int(x) for x in ds_uniform(len(weights), parts)]


@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("partition", ["compute", "parameters", "uniform"])
def test_stages_hold_every_parameter_once_and_the_tied_embedding_twice(pp, partition):
    cfg = load_config(GPT2_SMALL)
    shape = model_shape(cfg, tp=2)
    got = stages(shape, pp, partition)
    assert len(got) == pp and got[0].first and got[-1].last
    assert sum(s.blocks for s in got) == cfg.model.n_layer
    tied_copy = shape.shard_params[0] if pp > 1 else 0
    assert sum(s.params for s in got) == sum(shape.shard_params) + tied_copy
    bounds = stage_bounds(shape, pp, partition)
    assert bounds[0] == 0 and bounds[-1] == cfg.model.n_layer + 3


def test_tp_shards_matrices_and_keeps_norms_whole():
    cfg = load_config(GPT2_SMALL)
    whole, half = model_shape(cfg, 1), model_shape(cfg, 2)
    d = cfg.model.d_model
    assert whole.total_params == 123_587_328
    block = whole.params[1]
    assert half.shard_params[1] == (block - 2 * d) // 2 + 2 * d  # two RMSNorm gains stay whole
    assert half.shard_params[0] == whole.params[0] // 2  # the embedding is split by vocab rows
