"""`raylm export`: a plain PyTorch Hugging Face-style Llama, written here from config.json and model.safetensors
alone, must give raylm's logits; and the export folder loads back into raylm exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from raylm.checkpoint.export import export, load_export
from raylm.checkpoint.writer import save_full_weights
from raylm.cli import main
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.data.tokenizer import train_tokenizer
from raylm.errors import CheckpointError
from raylm.model.gpt import GPT, init_full_weights

RTOL = 1e-5  # asked for; measured: ~1e-7 (HF's float32 RoPE angles vs raylm's float64-then-float32)


def hf_llama_logits(folder, idx: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaForCausalLM forward, from its config.json and safetensors only (rotate-half RoPE)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    B, T = idx.shape
    n_head, n_kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim", d // n_head)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): HF pairs dimension k with k + hd/2
    cos, sin = emb.cos(), emb.sin()

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]))

    x = F.embedding(idx, w["model.embed_tokens.weight"])  # (B, T, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, n_head, hd).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, n_kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, n_head * hd)
        x = x + y @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T  # (B, T, vocab)


def tiny(tmp_path, tie: bool):
    cfg = resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 16, "out_dir": str(tmp_path / "data")},
            "model": {
                "n_layer": 2,
                "n_head": 4,
                "n_kv_head": 2,
                "d_model": 32,
                "max_seq_len": 16,
                "tie_embeddings": tie,
                "rope_theta": 500.0,
            },
        }
    )
    vocab = padded_vocab(cfg.data.vocab_size)
    gen = torch.Generator().manual_seed(3)
    # perturb the norm gains too, so a swapped norm cannot hide behind gains of 1
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, vocab, seed=1).items()
    }
    return cfg, vocab, weights


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_exported_llama_matches_raylm_logits(tmp_path, tie):
    cfg, vocab, weights = tiny(tmp_path, tie)
    run = tmp_path / "run"
    save_full_weights(cfg, weights, run / "checkpoints", 5)
    summary = export(run, tmp_path / "hf")  # a run folder: its newest committed checkpoint
    out = tmp_path / "hf"
    assert summary["step"] == 5 and summary["tensors"] == len(weights)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == vocab
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is tie
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert ("lm_head.weight" in names) is not tie
    assert (
        "model.layers.1.self_attn.q_proj.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    )

    model = GPT(cfg.model, vocab)
    model.load_state_dict(weights)
    idx = torch.randint(0, cfg.data.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
    got = hf_llama_logits(out, idx)
    assert ((got - want).abs().max() / want.abs().max()).item() < RTOL


def test_export_folder_loads_back_exactly(tmp_path):
    cfg, vocab, weights = tiny(tmp_path, tie=True)
    (tmp_path / "data").mkdir()
    train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, 300).save(
        str(tmp_path / "data" / "tokenizer.json")
    )
    checkpoint = save_full_weights(cfg, weights, tmp_path / "ck", 7)
    export(checkpoint, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        tmp_path / "data" / "tokenizer.json"
    ).read_bytes()
    tree, state = load_export(tmp_path / "hf")
    assert tree["data"]["vocab_size"] == 300 and tree["model"]["n_kv_head"] == 2
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


def test_export_refuses_a_corrupt_checkpoint(tmp_path):
    cfg, _, weights = tiny(tmp_path, tie=True)
    checkpoint = save_full_weights(cfg, weights, tmp_path / "ck", 1)
    layer = checkpoint / "model" / "002-layers.1.pt"
    layer.write_bytes(layer.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"002-layers\.1\.pt"):
        export(checkpoint, tmp_path / "hf")
    assert not list((tmp_path / "hf").iterdir())  # neither a partial model.safetensors nor its temporary


def test_export_cli(tmp_path, capsys):
    cfg, _, weights = tiny(tmp_path, tie=True)
    save_full_weights(cfg, weights, tmp_path / "run" / "checkpoints", 3)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == CheckpointError.exit_code
    assert "no committed checkpoint" in capsys.readouterr().err
