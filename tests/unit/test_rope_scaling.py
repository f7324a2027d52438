"""`model.rope_scaling` (llama3, linear, yarn): the rotary tables equal transformers', an export carries the
scaling and transformers' LlamaForCausalLM gives raylm's logits past the original context, and a bad mapping is
refused in one line with the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from raylm.checkpoint.export import export
from raylm.checkpoint.writer import save_full_weights
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import ConfigError
from raylm.model.gpt import GPT, init_full_weights
from raylm.model.rope import inv_freq_and_factor, rope_tables

ORIGINAL = 16  # the context the scaled model was "trained" at; every test looks past it
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {  # DeepSeek's form: the attention factor from mscale / mscale_all_dim, untruncated ramp
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
        "truncate": False,
    },
}
HEAD_DIM, THETA, MAX_LEN = 16, 500.0, 64
RTOL = 1e-5  # asked for; HF computes the angles in float32, raylm in float64


@pytest.mark.parametrize("name", SCALINGS)
def test_tables_equal_transformers(name):
    scaling = SCALINGS[name]
    hf_config = LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        rope_theta=THETA,
        rope_scaling=scaling,
    )
    hf = LlamaRotaryEmbedding(hf_config)
    hf_cos, hf_sin = hf(torch.zeros(1), torch.arange(MAX_LEN)[None])  # (1, T, hd): halves, each the table
    inv_freq, factor = inv_freq_and_factor(HEAD_DIM, THETA, MAX_LEN, scaling)
    assert torch.allclose(inv_freq.float(), hf.inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf.attention_scaling, rel=1e-12)
    assert not torch.allclose(inv_freq, inv_freq_and_factor(HEAD_DIM, THETA, MAX_LEN)[0])  # it does scale
    cos, sin = rope_tables(HEAD_DIM, MAX_LEN, THETA, scaling)  # (T, hd/2)
    assert torch.allclose(cos, hf_cos[0, :, : HEAD_DIM // 2], rtol=0, atol=1e-5)
    assert torch.allclose(sin, hf_sin[0, :, : HEAD_DIM // 2], rtol=0, atol=1e-5)


def scaled_model(tmp_path, scaling: dict):
    """(config, weights, export folder) of a small GQA model with `scaling`, trained-looking weights."""
    cfg = resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 32},
            "model": {
                "n_layer": 2,
                "n_head": 4,
                "n_kv_head": 2,
                "d_model": 4 * HEAD_DIM,
                "max_seq_len": MAX_LEN,
                "rope_theta": THETA,
                "rope_scaling": scaling,
            },
        }
    )
    gen = torch.Generator().manual_seed(3)
    weights = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, padded_vocab(300), seed=1).items()
    }
    save_full_weights(cfg, weights, tmp_path / "run" / "checkpoints", 4)
    export(tmp_path / "run", tmp_path / "hf")
    return cfg, weights, tmp_path / "hf"


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_transformers_gives_raylm_logits_past_the_original_context(tmp_path, name):
    cfg, weights, folder = scaled_model(tmp_path, SCALINGS[name])
    assert json.loads((folder / "config.json").read_text())["rope_scaling"] == SCALINGS[name]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = GPT(cfg.model, padded_vocab(300))
    model.load_state_dict(weights)
    idx = torch.randint(0, 300, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()(idx), hf(idx).logits  # (B, T, padded vocab)
    past = slice(ORIGINAL, None)  # positions beyond the original context
    err = (got[:, past] - want[:, past]).abs().max() / want[:, past].abs().max()
    assert err.item() < RTOL
    plain = GPT(
        dataclasses.replace(cfg.model, rope_scaling={}), padded_vocab(300)
    )  # the same weights, unscaled
    plain.load_state_dict(weights)
    with torch.no_grad():
        assert (plain.eval()(idx)[:, past] - want[:, past]).abs().max() / want[
            :, past
        ].abs().max() > 100 * RTOL


@pytest.mark.parametrize(
    "scaling,expected",
    [
        ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not one of linear, llama3, yarn"),
        ({"factor": 8.0}, "rope_type None is not one of"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs high_freq_factor, low_freq_factor, original_max"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3.0}, "takes no 'beta_fast'"),
        ({"rope_type": "linear", "factor": 0.5}, "factor=0.5 must be >= 1"),
        ({"rope_type": "yarn", "factor": "big"}, "factor='big' must be a positive number"),
        ({**SCALINGS["llama3"], "high_freq_factor": 0.5}, "high_freq_factor=0.5 must exceed low_freq_factor"),
        ({**SCALINGS["yarn"], "original_max_position_embeddings": 8.5}, "must be a positive integer"),
    ],
)
def test_bad_scaling_is_one_line_with_the_fix(scaling, expected):
    with pytest.raises(ConfigError) as err:
        resolve({"model": {"rope_scaling": scaling}})
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.rope_scaling=") and expected in message


def test_rope_scaling_must_be_a_mapping():
    with pytest.raises(ConfigError, match="model.rope_scaling must be a mapping"):
        resolve({"model": {"rope_scaling": "llama3"}})
    assert resolve({"model": {"rope_scaling": None}}).model.rope_scaling == {}
