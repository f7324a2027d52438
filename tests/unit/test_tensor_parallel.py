"""TP layers and vocab-parallel cross-entropy on a TP group of one (no process group); ranks > 1 run in
tests/distributed/test_parity.py::test_tp_layers_match_dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raylm.parallel.tensor import TPGroup, VocabParallelEmbedding, vocab_parallel_cross_entropy

SOLO = TPGroup(group=None, rank=0, size=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch_with_ignore_index(dtype):
    logits = (torch.randn(3, 7, 50) * 4).to(dtype)
    target = torch.randint(0, 50, (3, 7))
    target[1, 2:] = -100
    ours_in, ref_in = logits.clone().requires_grad_(), logits.float().clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(ours_in, target, SOLO)
    ref = F.cross_entropy(ref_in.flatten(0, 1), target.flatten(), ignore_index=-100)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours_in.grad.float(), ref_in.grad, atol=tol)
    assert ours_in.grad[1, 2:].abs().max() == 0  # ignored tokens get no gradient


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.full((2, 4), -100), SOLO)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max() == 0


def test_vocab_shard_embedding_masks_rows_of_other_ranks():
    # rank 1 of 2 owns rows 8..15; ids outside must give zeros (the all-reduce adds the other rank's rows)
    emb = VocabParallelEmbedding(16, 4, TPGroup(group=None, rank=1, size=2))
    assert emb.weight.shape == (8, 4) and emb.vocab_start == 8
    with torch.no_grad():
        emb.weight.copy_(torch.arange(32.0).view(8, 4))
    emb.tp = SOLO  # skip the all-reduce: check this rank's partial sum alone
    out = emb(torch.tensor([[3, 9]]))
    assert torch.equal(out[0, 0], torch.zeros(4)) and torch.equal(out[0, 1], emb.weight[1])
