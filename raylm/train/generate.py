"""`raylm generate`: load full weights on one process (whatever layout trained them) and continue prompts.

Prompts are encoded and decoded with the KV cache (raylm.model.sampling) up to `--batch-size` at a time, each
stopped at the first of: the end-of-text token (raylm's EOT, id 0: a document ended), a `--stop` string (cut
before it), or `--max-new-tokens`. A batch is left-padded with per-row positions and its own generator per
prompt, so each prompt's text is the one it gets alone. Prompts longer than the model's max_seq_len keep their
newest tokens; past the window the cache slides (see `decode_rows`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raylm.checkpoint.export import export_folder, load_export
from raylm.checkpoint.manifest import read_checkpoint_manifest
from raylm.checkpoint.reader import load_checkpoint_weights, local_checkpoint_files, resolve_checkpoint
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.data.cache import local_tokenizer
from raylm.data.tokenizer import EOT_ID, load_tokenizer_file
from raylm.errors import RaylmError
from raylm.log import get_logger
from raylm.model.gpt import GPT
from raylm.model.sampling import Sampler, decode_rows, row_sampler, slide_keep
from raylm.storage.file_names import TOKENIZER_FILE


class GenerateError(RaylmError):
    """A generate option or prompt file that cannot be used (the message names the value and the fix)."""

    exit_code = 2


@dataclass(frozen=True)
class GenerateOptions:
    """What `raylm generate` samples and when it stops; `check` rejects bad values with one line each."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 16  # prompts decoded together (a prompt's text does not depend on it)

    def check(self) -> None:
        if self.batch_size < 1:
            raise GenerateError(
                f"--batch-size {self.batch_size} is below 1; pass 1 (one prompt at a time) or more"
            )
        if self.max_new_tokens < 0:
            raise GenerateError(f"--max-new-tokens {self.max_new_tokens} is negative; pass 0 or more")
        if not self.temperature >= 0:  # also catches nan
            raise GenerateError(f"--temperature {self.temperature} is not >= 0; pass 0 (greedy) or more")
        if self.top_k < 0:
            raise GenerateError(f"--top-k {self.top_k} is negative; pass 0 (all tokens) or more")
        if not 0 < self.top_p <= 1:
            raise GenerateError(
                f"--top-p {self.top_p} is outside (0, 1]; pass a probability such as 0.9 "
                f"(1 keeps every token)"
            )
        if "" in self.stop:
            raise GenerateError(
                "--stop '' is empty and would stop before the first token; pass a non-empty string"
            )

    def sampler(self) -> Sampler:
        return Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation: the new text, how many tokens it took and why it stopped (eot|stop|length)."""

    prompt: str
    completion: str
    new_tokens: int
    stop_reason: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    def to_json(self) -> str:
        return json.dumps(
            {
                "prompt": self.prompt,
                "completion": self.completion,
                "new_tokens": self.new_tokens,
                "stop_reason": self.stop_reason,
            }
        )


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts in a text file, one per non-blank line; a line that is a JSON string ("def f():\\n") is
    decoded, so a prompt can hold newlines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GenerateError(
            f"--prompt-file {path} does not exist or is not a file; pass a text file with one prompt per line"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerateError(
            f"--prompt-file {path} cannot be read as UTF-8 text ({type(exc).__name__}); pass a "
            f"readable UTF-8 text file with one prompt per line"
        ) from None
    prompts = [_prompt_line(line) for line in lines if line.strip()]
    if not prompts:
        raise GenerateError(
            f"--prompt-file {path} has no prompts (every line is blank); write one prompt per line"
        )
    return prompts


def _prompt_line(line: str) -> str:
    if line.startswith('"') and line.endswith('"'):
        try:
            return str(json.loads(line))
        except json.JSONDecodeError:
            pass  # not JSON after all: the line as written
    return line


def load_weights(source: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(raw config tree, full state dict, local folder holding tokenizer.json) from an export folder, a
    checkpoint folder, or a run folder (its newest committed checkpoint); any of them may be an s3:// or gs://
    prefix, fetched into this node's cache first (checkpoint files verified against their manifest)."""
    export = export_folder(source)
    if export is not None:
        tree, state = load_export(export)
        return tree, state, export
    folder = resolve_checkpoint(source)
    tree, state = load_checkpoint_weights(folder)
    tokenizer = [TOKENIZER_FILE] if TOKENIZER_FILE in read_checkpoint_manifest(folder)["files"] else []
    return tree, state, local_checkpoint_files(folder, tokenizer)


def load_model(source: str | Path):
    """(model in eval mode, tokenizer, config) from an export, checkpoint or run folder."""
    tree, state, folder = load_weights(source)
    # neither the corpus nor the folder the run started from need exist where we generate
    cfg = resolve(tree, {"data.paths": [], "data.sources": [], "model.init_from": ""})
    model = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    model.load_state_dict(state)
    tokenizer_path = folder / TOKENIZER_FILE
    if not tokenizer_path.exists():
        tokenizer_path = local_tokenizer(cfg.data.out_dir, cfg.data.cache_dir)
    if not tokenizer_path.exists():
        raise RaylmError(
            f"no tokenizer.json in {folder} or {cfg.data.out_dir}; copy the run's tokenizer.json "
            f"into {folder}"
        )
    return model.eval(), load_tokenizer_file(tokenizer_path), cfg


def sampled_vocab(tokenizer, cfg) -> int:
    """How many token ids may be sampled: the tokenizer's tokens, which can be fewer than data.vocab_size when
    its training ran out of merges (the embedding rows past them were never a target and cannot be decoded)."""
    return min(cfg.data.vocab_size, tokenizer.get_vocab_size())


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """text up to the earliest stop string in it, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else None


@dataclass
class Continuation:
    """One prompt's new tokens as they come, until EOT or a stop string ends it (`done`)."""

    prompt: str
    new_ids: list[int] = field(default_factory=list)
    done: Completion | None = None

    def add(self, token: int, tokenizer, stop: tuple[str, ...]) -> None:
        if token == EOT_ID:
            self.done = Completion(self.prompt, tokenizer.decode(self.new_ids), len(self.new_ids), "eot")
            return
        self.new_ids.append(token)
        cut = cut_at_stop(tokenizer.decode(self.new_ids), stop) if stop else None
        if cut is not None:
            self.done = Completion(self.prompt, cut, len(self.new_ids), "stop")

    def completion(self, tokenizer) -> Completion:
        """The finished completion, or the text so far when the token budget ran out."""
        return self.done or Completion(
            self.prompt, tokenizer.decode(self.new_ids), len(self.new_ids), "length"
        )


def complete_batch(
    model, tokenizer, vocab_size: int, prompts: list[str], options: GenerateOptions
) -> list[Completion]:
    """Continue prompts together (one left-padded batch, KV cache) until each hits EOT, a stop string or
    max_new_tokens; decoding stops when every row has.

    Every prompt gets its own generator seeded with options.seed, so its text does not depend on the other
    prompts of a batch (or their order)."""
    ids = [tokenizer.encode(prompt).ids or [EOT_ID] for prompt in prompts]  # empty: start a new document
    draw = row_sampler(options.sampler(), [torch.Generator().manual_seed(options.seed) for _ in prompts])
    rows = [Continuation(prompt) for prompt in prompts]
    for next_ids in itertools.islice(decode_rows(model, ids, vocab_size, draw), options.max_new_tokens):
        for row, token in zip(rows, next_ids.view(-1).tolist(), strict=True):
            if row.done is None:  # a finished row is still computed with the batch; its tokens are dropped
                row.add(token, tokenizer, options.stop)
        if all(row.done for row in rows):
            break
    return [row.completion(tokenizer) for row in rows]


def complete(model, tokenizer, vocab_size: int, prompt: str, options: GenerateOptions) -> Completion:
    """Continue one prompt with the KV cache until EOT, a stop string or max_new_tokens."""
    return complete_batch(model, tokenizer, vocab_size, [prompt], options)[0]


def generate(source: str | Path, prompts: list[str], options: GenerateOptions) -> list[Completion]:
    """Each prompt's continuation from the model in an export, checkpoint or run folder, in prompt order.

    Prompts are decoded `options.batch_size` at a time, in order of length so that a batch pads little."""
    options.check()
    model, tokenizer, cfg = load_model(source)
    lengths = [len(tokenizer.encode(p).ids) for p in prompts]
    _warn_if_past_window(max(lengths), options, cfg.model.max_seq_len)
    vocab_size = sampled_vocab(tokenizer, cfg)
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    completions: dict[int, Completion] = {}
    for first in range(0, len(order), options.batch_size):
        batch = order[first : first + options.batch_size]
        done = complete_batch(model, tokenizer, vocab_size, [prompts[i] for i in batch], options)
        completions.update(zip(batch, done, strict=True))
    return [completions[i] for i in range(len(prompts))]


def _warn_if_past_window(longest: int, options: GenerateOptions, window: int) -> None:
    if longest + options.max_new_tokens > window:
        get_logger().warning(
            f"prompt ({longest} tokens) + --max-new-tokens {options.max_new_tokens} exceeds the model's "
            f"max_seq_len={window}: a longer prompt keeps its newest {window} tokens, and when the window fills "
            f"it slides to the newest {slide_keep(window)} tokens, so later tokens see less than all of the text"
        )


def generate_text(
    source: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    top_p: float = 1.0,
    stop: tuple[str, ...] = (),
) -> str:
    """The prompt followed by its continuation (at most `max_new_tokens` tokens), decoded."""
    options = GenerateOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=tuple(stop),
    )
    return generate(source, [prompt], options)[0].text
