"""`raylm eval --tasks`: lm-evaluation-harness's HF model on an export, offline, with the local raylm_val task; the
harness's log-likelihood of every document equals raylm's own loss on the same text, and a run is exported to a
temporary folder that is gone afterwards."""

from __future__ import annotations

import json
import math
import sys

import pytest
import test_hf_eval
import torch
from test_hf_eval import fresh_log_handler  # noqa: F401  (autouse: main's log handler per test)

from raylm.checkpoint.export import export
from raylm.cli import main
from raylm.config.derived import padded_vocab
from raylm.data.tokenizer import EOT_ID, load_tokenizer_file
from raylm.harness import VAL_TASK, HarnessOptions, run_harness
from raylm.model.gpt import GPT

try:
    import lm_eval.models.huggingface  # noqa: F401  (what raylm eval --tasks runs)

    HAS_HARNESS = True
except ImportError:
    HAS_HARNESS = False
needs_harness = pytest.mark.skipif(
    not HAS_HARNESS, reason="raylm eval --tasks needs pip install 'lm-eval[hf]'"
)
RTOL = 1e-4


run = test_hf_eval.run  # its small model, a fixture of this module too


@pytest.fixture(scope="module")
def model(run):
    """(config, weights, run folder, export folder, data folder): test_hf_eval's small model and its export."""
    cfg, weights, folder = run
    export(folder, folder.parent / "export")
    return cfg, weights, folder, folder.parent / "export", cfg.data.out_dir


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@torch.no_grad()
def raylm_log_likelihood(gpt: GPT, ids: list[int]) -> float:
    """-(raylm's loss x tokens) of one document, its first token predicted after the end-of-text token."""
    inputs = torch.tensor([[EOT_ID, *ids[:-1]]])
    return -gpt(inputs, torch.tensor([ids])).item() * len(ids)


@needs_harness
def test_harness_log_likelihoods_equal_raylm_loss(model):
    cfg, weights, _, folder, _ = model
    out = run_harness(folder, [VAL_TASK], HarnessOptions(log_samples=True))
    docs = out["samples"][VAL_TASK]
    assert len(docs) >= 16  # the evaluation's 16 windows, split at end-of-text tokens
    gpt = GPT(cfg.model, padded_vocab(cfg.data.vocab_size))
    gpt.load_state_dict(weights)
    gpt.eval()
    tokenizer = load_tokenizer_file(folder / "tokenizer.json")
    lls = []
    for doc in docs:
        ids = tokenizer.encode(doc["doc"]["text"]).ids
        assert 0 < len(ids) < cfg.model.max_seq_len  # one harness window
        want, got = raylm_log_likelihood(gpt, ids), doc["resps"][0][0]
        assert abs(got - want) <= RTOL * abs(want), (doc["doc"]["text"], got, want)
        lls.append(want)
    text_bytes = sum(len(doc["doc"]["text"].encode()) for doc in docs)
    bits_per_byte = -sum(lls) / text_bytes / math.log(2)
    assert out["results"][VAL_TASK]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=RTOL)


@needs_harness
def test_eval_tasks_on_a_run_prints_one_json_line(model, capsys):
    _, _, folder, _, data = model
    before = sorted(p.name for p in folder.iterdir())
    assert main(["eval", str(folder), "--tasks", VAL_TASK, "--limit", "2", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    row = json.loads(out)
    assert row["tasks"] == [VAL_TASK] and row["samples"] == {VAL_TASK: 2}
    assert row["results"][VAL_TASK]["bits_per_byte,none"] > 0
    assert sorted(p.name for p in folder.iterdir()) == before  # the export went to a temporary folder


@needs_harness
@pytest.mark.slow  # the harness indexes its thousands of tasks first (20 s here)
def test_unknown_task_is_one_line(model, capsys):
    _, _, _, folder, _ = model
    assert main(["eval", str(folder), "--tasks", "no_such_task"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_task: no such lm-eval task" in err and "--include-path" in err


def test_without_the_harness_one_line_names_the_install(model, capsys, monkeypatch):
    _, _, _, folder, _ = model
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed: its import fails
    assert main(["eval", str(folder), "--tasks", VAL_TASK]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lm-eval[hf]'" in err
