"""The single-device GPT: shapes, deterministic name-seeded init, tying, GQA, RoPE and the FLOP count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from raylm.config.schema import ModelConfig
from raylm.model.facts import flops_per_token
from raylm.model.gpt import GPT, apply_rope, init_full_weights, param_count, param_shapes
from raylm.model.rope import rope_tables

CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
VOCAB = 128


def test_forward_shapes_and_loss():
    model = GPT(CFG, VOCAB)
    model.load_state_dict(init_full_weights(CFG, VOCAB, seed=0))
    idx = torch.randint(0, VOCAB, (3, 10))
    assert model(idx).shape == (3, 10, VOCAB)
    targets = idx.clone()
    targets[:, :2] = -100
    loss = model(idx, targets)
    ref = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item())


def test_init_is_a_pure_function_of_config_and_seed():
    a, b = init_full_weights(CFG, VOCAB, seed=1), init_full_weights(CFG, VOCAB, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = init_full_weights(CFG, VOCAB, seed=2)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    # per-name seeds: adding layers leaves existing unscaled weights unchanged (w2, wo scale with n_layer)
    deeper = init_full_weights(dataclasses.replace(CFG, n_layer=3), VOCAB, seed=1)
    assert torch.equal(a["layers.1.feed_forward.w1.weight"], deeper["layers.1.feed_forward.w1.weight"])


def test_init_std_and_norms():
    w = init_full_weights(CFG, VOCAB, seed=0)
    assert torch.equal(w["norm.weight"], torch.ones(CFG.d_model))
    assert w["tok_embeddings.weight"].std().item() == pytest.approx(CFG.init_std, rel=0.1)
    assert w["layers.0.attention.wo.weight"].std().item() == pytest.approx(CFG.init_std / 2, rel=0.15)


def test_tied_head_has_no_output_weight():
    assert "output.weight" not in param_shapes(CFG, VOCAB)
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    assert param_shapes(untied, VOCAB)["output.weight"] == (VOCAB, CFG.d_model)
    assert param_count(untied, VOCAB) == param_count(CFG, VOCAB) + VOCAB * CFG.d_model


def test_llama_names_and_gqa_shapes():
    shapes = param_shapes(CFG, VOCAB)
    head_dim = CFG.d_model // CFG.n_head
    assert shapes["layers.1.attention.wk.weight"] == (2 * head_dim, CFG.d_model)
    assert shapes["layers.1.feed_forward.w1.weight"] == (128, CFG.d_model)  # 8/3 * 32 rounded up to 64s
    assert {n.split(".", 2)[-1] for n in shapes if n.startswith("layers.0.")} == {
        "attention_norm.weight",
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "attention.wo.weight",
        "ffn_norm.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
    }


def test_param_count_and_flops():
    d, L, V, hidden, kv = 32, 2, VOCAB, 128, 16
    per_block = 2 * d * d + 2 * kv * d + 3 * d * hidden + 2 * d
    assert param_count(CFG, V) == V * d + L * per_block + d
    assert flops_per_token(CFG, V, seq_len=16) == 6 * param_count(CFG, V) + 12 * L * d * 16
    untied = dataclasses.replace(CFG, tie_embeddings=False)  # the input lookup does no matmul
    assert flops_per_token(untied, V, seq_len=16) == flops_per_token(CFG, V, seq_len=16)


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        qi = apply_rope(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(10, 7), rel=1e-5)
    assert score(3, 3) == pytest.approx((q * k).sum().item(), rel=1e-5)


def test_causal():
    model = GPT(CFG, VOCAB)
    model.load_state_dict(init_full_weights(CFG, VOCAB, seed=0))
    idx = torch.randint(0, VOCAB, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % VOCAB
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :5], model(changed)[:, :5])
