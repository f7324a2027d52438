"""`raylm generate`: load full weights on one process (whatever layout trained them) and sample text."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import RaylmError


def load_weights(source: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(raw config tree, full state dict, folder holding tokenizer.json) from an export folder, a checkpoint
    folder, or a run folder (its newest committed checkpoint)."""
    from raylm.checkpoint.export import load_export
    from raylm.checkpoint.reader import load_checkpoint_weights, resolve_checkpoint

    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        tree, state = load_export(path)
        return tree, state, path
    folder = resolve_checkpoint(path)
    tree, state = load_checkpoint_weights(folder)
    return tree, state, folder


def load_model(source: str | Path):
    """(model in eval mode, tokenizer, config) from an export, checkpoint or run folder."""
    from raylm.data.tokenizer import load_tokenizer_file
    from raylm.model.gpt import GPT

    tree, state, folder = load_weights(source)
    cfg = resolve(tree, {"data.paths": [], "data.sources": []})  # the corpus need not exist where we generate
    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(state)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.exists():
        tokenizer_path = Path(cfg.data.out_dir).expanduser() / "tokenizer.json"
    if not tokenizer_path.exists():
        raise RaylmError(f"no tokenizer.json in {folder} or {cfg.data.out_dir}; copy the run's tokenizer.json "
                         f"into {folder}")
    return model.eval(), load_tokenizer_file(tokenizer_path), cfg


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, max_seq_len: int, vocab_size: int,
           temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Autoregressive sampling; logits past the tokenizer's vocab (padding rows) are never chosen."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -max_seq_len:])[:, -1, :vocab_size]  # (B, V)
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def generate_text(source: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens, decoded."""
    model, tokenizer, cfg = load_model(source)
    ids = tokenizer.encode(prompt).ids or [0]
    idx = torch.tensor([ids], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    out = sample(model, idx, max_new_tokens, cfg.model.max_seq_len, cfg.data.vocab_size, temperature, top_k,
                 generator)
    return tokenizer.decode(out[0].tolist())
