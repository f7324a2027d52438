"""Generation: the pure sampler from tables, the KV cache against full-window recompute, GQA through SDPA, and
`raylm generate` on checkpoint and export folders with its stops, prompt files and one-line errors."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raylm.checkpoint.writer import save_full_weights
from raylm.cli import main
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.config.schema import ModelConfig
from raylm.data.tokenizer import EOT_ID, train_tokenizer
from raylm.model.gpt import GPT, KVCache, apply_rope, init_full_weights
from raylm.model.sampling import (
    Sampler,
    decode_cached,
    decode_full_window,
    decode_rows,
    filter_logits,
    left_padded,
    next_token,
    row_sampler,
    slide_keep,
)
from raylm.train.generate import GenerateOptions, complete, generate, generate_text, load_model, sampled_vocab

CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
VOCAB = 128
GREEDY = Sampler(temperature=0)
TEXTS = [
    "def main(args):\n    return args\n",
    "import os\nimport sys\n",
    "for i in range(10):\n    print(i)\n",
] * 20

# probabilities exact in binary, all different: sorted 0.5 (id 1), 0.25 (id 3), 0.1875 (id 2), 0.0625 (id 0), so the
# mass before each in sorted order is exactly 0, 0.5, 0.75, 0.9375
PROBS = torch.tensor([[0.0625, 0.5, 0.1875, 0.25]])


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding a small model is a few dozen tiny kernels a token: on one thread they run in microseconds, on two
    they can spin against a busy neighbour for milliseconds each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg: ModelConfig = CFG, vocab: int = VOCAB, seed: int = 0) -> GPT:
    model = GPT(cfg, vocab)
    model.load_state_dict(init_full_weights(cfg, vocab, seed=seed))
    return model.eval()


def take(tokens, n: int) -> list[int]:
    return torch.cat(list(itertools.islice(tokens, n)), dim=1)[0].tolist()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


# --- the sampler -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_k, top_p, want",
    [
        (0, 1.0, {0, 1, 2, 3}),
        (1, 1.0, {1}),
        (2, 1.0, {1, 3}),
        (3, 1.0, {1, 2, 3}),
        (9, 1.0, {0, 1, 2, 3}),  # k past the vocabulary keeps everything
        (0, 0.3, {1}),  # the most likely token always stays
        (0, 0.5, {1}),  # id 1 alone reaches 0.5
        (0, 0.52, {1, 3}),
        (0, 0.75, {1, 3}),
        (0, 0.8, {1, 2, 3}),
        (0, 0.95, {0, 1, 2, 3}),
        (2, 0.6, {1}),  # after top-k, id 1 holds 2/3 of what is left
        (2, 0.7, {1, 3}),
        (2, 0.3, {1}),
        (3, 0.52, {1}),  # the nucleus is taken over what top-k left: id 1 has 0.5 / 0.9375 > 0.52 of it
    ],
)
def test_filter_logits_table(top_k, top_p, want):
    assert kept(filter_logits(PROBS.log(), top_k, top_p)) == want


def test_filter_keeps_ties_at_the_kth_logit_and_leaves_kept_logits_unchanged():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert kept(filter_logits(logits, top_k=1)) == {1, 2}
    out = filter_logits(logits, top_k=3, top_p=0.99)
    assert torch.equal(out[0, 1:], logits[0, 1:])


def test_top_p_acts_on_each_row_alone():
    logits = torch.stack([PROBS[0].log(), PROBS[0].flip(0).log()])  # (2, 4)
    out = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_greedy_is_argmax_and_top_k_1_is_greedy_at_any_temperature():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(next_token(logits, GREEDY), want)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(next_token(logits, Sampler(temperature=2.0, top_k=1), gen), want)


def test_seeded_sampling_repeats_and_never_leaves_the_nucleus():
    sampler = Sampler(temperature=1.0, top_p=0.6)
    logits = PROBS.log().expand(2000, 4)

    def draws(seed: int) -> torch.Tensor:
        return next_token(logits, sampler, torch.Generator().manual_seed(seed)).flatten()

    first, again = draws(7), draws(7)
    assert torch.equal(first, again)
    assert set(first.tolist()) == {1, 3}
    assert 0.6 < (first == 1).float().mean().item() < 0.73  # renormalised: 0.5 / 0.75 = 2/3


# --- the KV cache ------------------------------------------------------------------------------------------


def test_gqa_through_sdpa_matches_repeated_heads():
    model = random_model()
    attn = model.layers[0].attention
    x = torch.randn(2, 12, CFG.d_model)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    q = apply_rope(attn.wq(x).view(2, 12, 4, 8), cos, sin).transpose(1, 2)  # (B, Hq, T, hd)
    k = apply_rope(attn.wk(x).view(2, 12, 2, 8), cos, sin).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 12, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(
        torch.ones(12, 12).triu(1).bool(), -math.inf
    )
    want = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 12, 32))
    with torch.no_grad():
        assert torch.allclose(attn(x, cos, sin), want, atol=1e-6)


def test_cached_logits_match_the_full_forward_for_prefill_steps_and_chunks():
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = KVCache(model, batch=2)
        parts = [model(idx[:, :7], cache=cache)]  # prefill
        parts += [model(idx[:, t : t + 1], cache=cache) for t in range(7, 12)]  # one token a step
        parts += [model(idx[:, 12:20], cache=cache)]  # a chunk after cached tokens: the shifted causal mask
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_greedy_cached_decoding_gives_the_full_window_tokens(prompt_len):
    model = random_model(seed=3)
    idx = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    n = CFG.max_seq_len - prompt_len  # up to the window's end
    assert take(decode_cached(model, idx, VOCAB, GREEDY), n) == take(
        decode_full_window(model, idx, VOCAB, GREEDY), n
    )


def test_seeded_sampling_gives_the_same_tokens_cached_or_not():
    model = random_model(seed=4)
    idx = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    sampler = Sampler(temperature=1.0, top_k=20, top_p=0.9)
    cached = take(decode_cached(model, idx, VOCAB, sampler, torch.Generator().manual_seed(5)), 20)
    full = take(decode_full_window(model, idx, VOCAB, sampler, torch.Generator().manual_seed(5)), 20)
    assert cached == full


def test_padding_rows_of_the_vocabulary_are_never_chosen():
    model = random_model()
    with torch.no_grad():
        model.tok_embeddings.weight[100:] = (
            50 * model.tok_embeddings.weight[:28]
        )  # padding rows win the argmax
    tokens = take(decode_cached(model, torch.tensor([[5]]), 100, GREEDY), 30)
    assert max(tokens) < 100


def test_past_the_window_the_cache_slides_and_matches_a_fresh_window():
    model = random_model(seed=5)
    window = CFG.max_seq_len
    prompt = torch.randint(
        0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3)
    )  # longer than the window
    tokens = take(decode_cached(model, prompt, VOCAB, GREEDY), 2 * window)
    assert len(tokens) == 2 * window and max(tokens) < VOCAB
    # the first slide comes with the first new token (the prompt filled the window): it re-encodes the newest
    # slide_keep tokens at positions 0.., so the second token is the greedy pick after exactly those
    context = torch.cat([prompt, torch.tensor([tokens[:1]])], dim=1)[:, -slide_keep(window) :]
    with torch.no_grad():
        assert model(context)[0, -1].argmax().item() == tokens[1]


# --- batches of prompts of different lengths --------------------------------------------------------------

PROMPT_LENGTHS = [1, 5, 13, 40]  # 40 > the window: the row keeps its newest 32 tokens


def random_prompts(lengths: list[int], seed: int = 6) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def test_a_left_padded_batch_gives_each_row_its_logits_alone():
    model = random_model(seed=7)
    rows = random_prompts([3, 9, 6])
    idx, pad = left_padded(rows)
    assert pad is not None and pad.tolist() == [6, 0, 3] and idx[0, :6].tolist() == [0] * 6
    steps = torch.tensor([[11], [12], [13]])
    with torch.no_grad():
        cache = KVCache(model, batch=3, pad=pad)
        batch = [model(idx, cache=cache)[:, -1]] + [model(steps, cache=cache)[:, -1] for _ in range(3)]
        for b, row in enumerate(rows):
            alone = KVCache(model, batch=1)
            want = [model(torch.tensor([row]), cache=alone)[:, -1]]
            want += [model(steps[b : b + 1], cache=alone)[:, -1] for _ in range(3)]
            assert all(torch.allclose(got[b], w[0], atol=1e-5) for got, w in zip(batch, want, strict=True))


@pytest.mark.parametrize("sampler", [GREEDY, Sampler(temperature=1.0, top_k=20, top_p=0.9)])
def test_each_row_of_a_batch_decodes_what_it_decodes_alone(sampler):
    """Past the window too: the longest row slides at its own step, the others are re-encoded whole."""
    model = random_model(seed=8)
    prompts = random_prompts(PROMPT_LENGTHS)
    n = 2 * CFG.max_seq_len

    def draw(rows: int):
        return row_sampler(sampler, [torch.Generator().manual_seed(9) for _ in range(rows)])

    batch = torch.cat(list(itertools.islice(decode_rows(model, prompts, VOCAB, draw(4)), n)), dim=1)
    for row, prompt in zip(batch.tolist(), prompts, strict=True):
        assert row == take(decode_rows(model, [prompt], VOCAB, draw(1)), n)
    n_alone = CFG.max_seq_len - PROMPT_LENGTHS[1]  # and alone, up to the window, the full-window path's
    assert batch[1, :n_alone].tolist() == take(
        decode_full_window(
            model, torch.tensor([prompts[1]]), VOCAB, sampler, torch.Generator().manual_seed(9)
        ),
        n_alone,
    )


# --- raylm generate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A committed weights-only checkpoint of a random model with a real (tiny) tokenizer.json beside it."""
    root = tmp_path_factory.mktemp("gen")
    cfg = resolve(
        {
            "data": {"vocab_size": 300, "seq_len": 32, "out_dir": str(root / "data")},
            "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 32},
        }
    )
    (root / "data").mkdir()
    train_tokenizer(TEXTS, cfg.data.vocab_size).save(str(root / "data" / "tokenizer.json"))
    weights = init_full_weights(cfg.model, padded_vocab(cfg.data.vocab_size), seed=2)
    save_full_weights(cfg, weights, root / "run" / "checkpoints", 3)
    return root / "run"


def full_window_text(run, prompt: str, n: int) -> str:
    """Today's path before the cache: re-run the window for every token, no stops."""
    model, tokenizer, cfg = load_model(run)
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    tokens = take(decode_full_window(model, idx, sampled_vocab(tokenizer, cfg), GREEDY), n)
    return prompt + tokenizer.decode(tokens)


def test_greedy_text_is_the_full_window_text(checkpoint):
    out = generate(checkpoint, ["def main("], GenerateOptions(temperature=0, max_new_tokens=20))[0]
    assert out.new_tokens > 0  # fewer than 20 only when EOT came first
    assert out.text == full_window_text(checkpoint, "def main(", out.new_tokens)


def test_export_and_checkpoint_folders_give_the_same_text(checkpoint, tmp_path):
    from raylm.checkpoint.export import export

    export(checkpoint, tmp_path / "hf")
    want = generate_text(checkpoint, "import ", max_new_tokens=10, seed=3)
    assert generate_text(tmp_path / "hf", "import ", max_new_tokens=10, seed=3) == want


def test_stops_at_end_of_text(checkpoint):
    model, tokenizer, cfg = load_model(checkpoint)
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()  # every logit 0: the greedy pick is the first id, EOT
    out = complete(
        model, tokenizer, sampled_vocab(tokenizer, cfg), "x", GenerateOptions(temperature=0, max_new_tokens=9)
    )
    assert (out.completion, out.new_tokens, out.stop_reason) == ("", 0, "eot")
    assert EOT_ID == 0


def test_stops_at_a_stop_string_and_cuts_before_it(checkpoint):
    free = generate(checkpoint, ["for "], GenerateOptions(temperature=0, max_new_tokens=16))[0]
    assert free.stop_reason in ("length", "eot") and len(free.completion) >= 3
    stop = free.completion[1:3]
    first = free.completion.find(stop)
    out = generate(
        checkpoint, ["for "], GenerateOptions(temperature=0, max_new_tokens=16, stop=("@@@", stop))
    )[0]
    assert out.stop_reason == "stop" and out.completion == free.completion[:first]


def test_prompt_file_gives_each_prompt_its_text_alone(checkpoint, tmp_path, capsys):
    prompts = ["def ", "import os, sys", "x = [1, 2,\n  3]"]
    path = tmp_path / "prompts.txt"
    path.write_text(f"{prompts[0]}\n\n{prompts[1]}\n{json.dumps(prompts[2])}\n")
    assert (
        main(
            [
                "generate",
                str(checkpoint),
                "--prompt-file",
                str(path),
                "--max-new-tokens",
                "8",
                "--top-p",
                "0.9",
                "--seed",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        alone = generate_text(checkpoint, row["prompt"], max_new_tokens=8, top_p=0.9, seed=4)
        assert row["prompt"] + row["completion"] == alone and row["stop_reason"] in ("length", "eot", "stop")


def test_batched_prompts_stop_on_their_own_and_keep_their_text_alone(checkpoint):
    prompts = ["def ", "import os, sys, json", "x", "for i in range(10):\n    print("]
    free = generate(checkpoint, prompts, GenerateOptions(temperature=0, max_new_tokens=12, batch_size=1))
    stop = free[1].completion[2:4]  # ends the second prompt early; the others may run on
    options = GenerateOptions(temperature=0, max_new_tokens=12, stop=(stop,), batch_size=1)
    alone = generate(checkpoint, prompts, options)
    batched = generate(checkpoint, prompts, replace(options, batch_size=3))  # a batch of 3, then one of 1
    assert batched == alone and alone[1].stop_reason == "stop"
    assert any(c.new_tokens > alone[1].new_tokens for c in alone)  # a row went on after one had stopped


def test_one_prompt_prints_its_text(checkpoint, capsys):
    assert (
        main(["generate", str(checkpoint), "--prompt", "def ", "--max-new-tokens", "5", "--seed", "1"]) == 0
    )
    assert capsys.readouterr().out == generate_text(checkpoint, "def ", max_new_tokens=5, seed=1) + "\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prompt", "a", "--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
        (["--prompt", "a", "--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
        (["--prompt", "a", "--top-p", "nan"], ["--top-p nan"]),
        (["--prompt", "a", "--temperature", "-1"], ["--temperature -1.0"]),
        (["--prompt", "a", "--temperature", "nan"], ["--temperature nan"]),
        (["--prompt", "a", "--top-k", "-2"], ["--top-k -2"]),
        (["--prompt", "a", "--max-new-tokens", "-1"], ["--max-new-tokens -1"]),
        (["--prompt", "a", "--stop", ""], ["--stop ''"]),
        (["--prompt", "a", "--batch-size", "0"], ["--batch-size 0"]),
        (["--prompt-file", "MISSING"], ["does not exist"]),
        (["--prompt-file", "EMPTY"], ["no prompts"]),
        (["--prompt-file", "BINARY"], ["UTF-8"]),
        (["--prompt-file", "."], ["not a file"]),
    ],
)
def test_bad_input_is_one_line_before_any_weights_load(tmp_path, capsys, args, words):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 prompt\n")
    files = {"MISSING": "missing.txt", "EMPTY": "empty.txt", "BINARY": "binary.txt", ".": "."}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    assert main(["generate", str(tmp_path / "no-such-run"), *args]) == 2  # the run is never opened
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raylm: error: ") and "Traceback" not in err
    assert all(w in err for w in words), err


def test_prompt_and_prompt_file_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--prompt", "a", "--prompt-file", "p.txt"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_sdpa_takes_enable_gqa():
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # 4 query heads share 2 kv heads
    assert F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).shape == (1, 4, 3, 8)
