"""data.document_mask: document ids and positions from a window's EOTs, and a model whose tokens see their own
document only: changing the previous document of the window leaves a token's logits as they were."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raylm.config.schema import ModelConfig
from raylm.data.documents import document_ids, document_positions
from raylm.data.tokenizer import EOT_ID
from raylm.model.gpt import GPT, init_full_weights

CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
VOCAB = 128
E = EOT_ID


def test_ids_and_positions_from_the_eots():
    window = np.array(
        [[5, 6, E, 7, 8, 9, E, E, 4]]
    )  # a partial document, a whole one, an empty one, a partial
    assert document_ids(window).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3]]
    assert document_positions(window, "restart").tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert document_positions(window, "continue").tolist() == [list(range(9))]


def model() -> GPT:
    gen = torch.Generator().manual_seed(1)
    weights = {
        k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in init_full_weights(CFG, VOCAB, 3).items()
    }
    gpt = GPT(CFG, VOCAB)
    gpt.load_state_dict(weights)
    return gpt.eval()


def logits_of_last_document(gpt: GPT, previous: list[int], last: list[int], mode: str | None) -> torch.Tensor:
    """The last document's logits (T_last, vocab) in the window [previous, EOT, last]; mode None: no mask."""
    tokens = torch.tensor([[*previous, E, *last]])  # (1, T)
    documents = None
    if mode is not None:
        window = tokens.numpy()
        documents = (
            torch.from_numpy(document_ids(window)),
            torch.from_numpy(document_positions(window, mode)),
        )
    with torch.no_grad():
        return gpt(tokens, documents=documents)[0, -len(last) :]


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_a_token_does_not_see_the_previous_document(mode):
    gpt, gen = model(), torch.Generator().manual_seed(0)
    last = torch.randint(1, VOCAB, (12,), generator=gen).tolist()
    base = logits_of_last_document(gpt, torch.randint(1, VOCAB, (9,), generator=gen).tolist(), last, mode)
    other_text = logits_of_last_document(
        gpt, torch.randint(1, VOCAB, (9,), generator=gen).tolist(), last, mode
    )
    assert torch.allclose(other_text, base, rtol=0, atol=1e-6)  # same positions: only the masking works here
    # another length moves the last document's positions under `continue`; RoPE sees only offsets within it
    other_length = logits_of_last_document(
        gpt, torch.randint(1, VOCAB, (4,), generator=gen).tolist(), last, mode
    )
    assert ((other_length - base).abs().max() / base.abs().max()).item() < 1e-5


def test_without_the_mask_the_previous_document_shows():
    gpt, gen = model(), torch.Generator().manual_seed(0)
    last = torch.randint(1, VOCAB, (12,), generator=gen).tolist()
    a = logits_of_last_document(gpt, torch.randint(1, VOCAB, (9,), generator=gen).tolist(), last, None)
    b = logits_of_last_document(gpt, torch.randint(1, VOCAB, (9,), generator=gen).tolist(), last, None)
    assert (a - b).abs().max() > 1e-2


def test_one_document_is_plain_causal_attention():
    gpt = model()
    tokens = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    window = tokens.numpy()
    documents = (
        torch.from_numpy(document_ids(window)),
        torch.from_numpy(document_positions(window, "restart")),
    )
    with torch.no_grad():
        assert torch.allclose(gpt(tokens, documents=documents), gpt(tokens), rtol=0, atol=1e-5)


def test_positions_index_the_scaled_tables_too():
    """restart and continue differ only by rounding, also under a RoPE scaling (it changes frequencies only)."""
    scaled = dataclasses.replace(CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    gpt = GPT(scaled, VOCAB)
    gpt.load_state_dict(model().state_dict())
    last = list(range(1, 13))
    restart = logits_of_last_document(gpt.eval(), list(range(30, 39)), last, "restart")
    cont = logits_of_last_document(gpt, list(range(30, 39)), last, "continue")
    assert ((restart - cont).abs().max() / cont.abs().max()).item() < 1e-5
