"""`raylm export` as transformers sees it: AutoModelForCausalLM and AutoTokenizer load the folder, the logits
equal raylm's, and greedy decoding continues a prompt exactly as raylm's model does."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from raylm.checkpoint.export import export
from raylm.checkpoint.writer import save_full_weights
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.data.tokenizer import EOT_ID, load_tokenizer_file, train_tokenizer
from raylm.model.gpt import GPT, init_full_weights

RTOL = 1e-4  # asked for; measured: ~3e-6 at T=40 (HF computes RoPE angles in float32, raylm in float64)
TEXTS = [
    "def main(argv):\n    return run(argv[1:])  # the entry point\n",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    total += i * i\n",
    "class Tokenizer:\n    pass  # café über ☃\n",
] * 25
PROMPT = "def main(argv):\n    "


def tokenizer_folder(folder, vocab_size: int = 300):
    """folder/tokenizer.json: a byte-level BPE trained the way `raylm prepare` trains one."""
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(TEXTS, vocab_size).save(str(folder / "tokenizer.json"))
    return folder


def exported(tmp_path, tie: bool):
    """(config, full weights, export folder) of a small GQA model whose checkpoint carries a tokenizer."""
    data = tokenizer_folder(tmp_path / "data")
    cfg = resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 32, "out_dir": str(data)},
            "model": {
                "n_layer": 2,
                "n_head": 4,
                "n_kv_head": 2,
                "d_model": 32,
                "max_seq_len": 64,
                "tie_embeddings": tie,
                "rope_theta": 500.0,
            },
        }
    )
    gen = torch.Generator().manual_seed(3)
    # large perturbations: peaked next-token distributions, so greedy choices are not near-ties
    weights = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, padded_vocab(300), seed=1).items()
    }
    save_full_weights(cfg, weights, tmp_path / "run" / "checkpoints", 4)
    export(tmp_path / "run", tmp_path / "hf")
    return cfg, weights, tmp_path / "hf"


def raylm_model(cfg, weights) -> GPT:
    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def raylm_greedy(model: GPT, ids: list[int], new_tokens: int, vocab_size: int) -> list[int]:
    """What `raylm generate --temperature 0` does: full-window recompute, argmax below the tokenizer's vocab."""
    idx = torch.tensor([ids])
    for _ in range(new_tokens):
        logits = model(idx[:, -model.cfg.max_seq_len :])[:, -1, :vocab_size]  # (1, V)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0].tolist()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_loads_the_export_with_raylm_logits(tmp_path, tie):
    cfg, weights, folder = exported(tmp_path, tie)
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or resized tensors
    idx = torch.randint(0, cfg.data.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = raylm_model(cfg, weights)(idx)  # (B, T, padded vocab)
        got = hf(idx).logits
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < RTOL


def test_special_tokens_and_tokenizer_match_raylm(tmp_path):
    cfg, _, folder = exported(tmp_path, tie=True)
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (EOT_ID, EOT_ID, 1)
    assert config["vocab_size"] == padded_vocab(
        cfg.data.vocab_size
    )  # the embedding's rows, not the tokenizer's
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 0, 1)
    assert generation.suppress_tokens == list(range(300, padded_vocab(300)))  # padding rows are never sampled
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 0, 1)
    ours = load_tokenizer_file(folder / "tokenizer.json")
    text = "x = 'naïve' <|endoftext|> done\n"  # a special-token string inside text stays ordinary text
    assert hf_tok(text)["input_ids"] == ours.encode(text).ids
    assert EOT_ID not in ours.encode(text).ids
    assert hf_tok.decode(ours.encode(text).ids) == text
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"


def test_greedy_continuation_matches_raylm(tmp_path):
    cfg, weights, folder = exported(tmp_path, tie=False)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ours = load_tokenizer_file(folder / "tokenizer.json")
    prompt_ids = ours.encode(PROMPT).ids
    new_tokens = 24
    want = raylm_greedy(raylm_model(cfg, weights), prompt_ids, new_tokens, cfg.data.vocab_size)
    inputs = hf_tok(PROMPT, return_tensors="pt")
    got = hf.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)[0].tolist()
    if EOT_ID in want[len(prompt_ids) :]:  # HF stops at EOS (raylm's end of document); raylm goes on
        want = want[: want.index(EOT_ID, len(prompt_ids)) + 1]
    assert got == want
    assert len(set(want[len(prompt_ids) :])) > 3  # a real continuation, not one token repeated
    assert hf_tok.decode(got, skip_special_tokens=True) == ours.decode(want)
