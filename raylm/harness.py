"""`raylm eval --tasks`: EleutherAI's lm-evaluation-harness, in this process, on an export; an application.

    summary = harness_eval("runs/t1", ["raylm_val"])   # {"source", "tasks", "results", "samples"}

The harness runs its Hugging Face model (`HFLM`, what `lm_eval --model hf --model_args pretrained=EXPORT` runs)
in fp32 on an export folder as it is; a run or checkpoint is exported into a temporary folder first, removed after.

`raylm_val` is a local task (no download; it runs with HF_DATASETS_OFFLINE=1): the samples `raylm eval` scores
(train.eval_samples windows of data.seq_len tokens of the validation split, in the run's order), each split at its
end-of-text tokens into documents and decoded to text, written as JSONL next to the task's YAML in a temporary
folder. The harness scores each text as a rolling log-likelihood (`loglikelihood_rolling`, the shape of its
wikitext task): windows of the model's positions, the first token predicted after the end-of-text token, as raylm
training predicts a document's first token after the previous document's end. Its metrics are word_perplexity,
byte_perplexity and bits_per_byte.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from raylm.checkpoint.export import export, export_folder
from raylm.data.tokenizer import EOT_ID, load_tokenizer_file
from raylm.errors import DataError, RaylmError
from raylm.evaluate import EvalPlan, eval_stream, plan_eval
from raylm.storage.atomic import write_atomic

VAL_TASK = "raylm_val"
INSTALL = "pip install 'lm-eval[hf]' (the harness with its Hugging Face model)"


def _harness():
    """lm-eval's simple_evaluate, HFLM and TaskManager, or one line saying how to install them."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RaylmError(f"raylm eval --tasks needs lm-evaluation-harness ({exc}); {INSTALL}") from None
    return simple_evaluate, HFLM, TaskManager


def val_texts(plan: EvalPlan, split: str = "val") -> list[str]:
    """The evaluation's samples of `split` as documents of text: each window split at end-of-text tokens."""
    if plan.opened.tokenizer is None:
        raise DataError(
            f"{VAL_TASK} decodes the validation samples with the model's tokenizer, but the source carries no "
            f"tokenizer.json; evaluate an export or run that has one"
        )
    tokenizer = load_tokenizer_file(plan.opened.tokenizer)
    stream = eval_stream(plan, split, micro_batch=1)
    texts = []
    try:
        for _ in range(plan.samples):
            inputs, targets = next(stream)  # (1, T) each; the window is inputs then the last target
            window = torch.cat([inputs[0], targets[0, -1:]]).tolist()
            documents, start = [], 0
            for end in [i for i, token in enumerate(window) if token == EOT_ID] + [len(window)]:
                documents.append(window[start:end])
                start = end + 1
            texts += [tokenizer.decode(ids) for ids in documents if ids]
    finally:
        stream.close()
    return [text for text in texts if text.strip()]


def write_val_task(folder: Path, texts: list[str]) -> Path:
    """folder/raylm_val.jsonl and the task's YAML beside it (its data path absolute; datasets' cache inside)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{VAL_TASK}.jsonl"
    write_atomic(data, "".join(json.dumps({"text": text}) + "\n" for text in texts))
    task = {
        "task": VAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1.0},
    }
    write_atomic(folder / f"{VAL_TASK}.yaml", yaml.safe_dump(task, sort_keys=False))
    return folder


def _model_folder(source: str | Path, scratch: Path) -> Path:
    """The export folder to load: `source` itself when it is one, else its export written into `scratch`."""
    folder = export_folder(source)
    if folder is not None:
        return folder
    export(source, scratch / "export")
    return scratch / "export"


@dataclass(frozen=True)
class HarnessOptions:
    """How `raylm eval --tasks` runs the harness."""

    include_path: str | None = None  # a folder of the user's own task YAMLs
    data: str | Path | None = None  # raylm_val: the prepared data (default: the run's own)
    batches: int | None = None  # raylm_val: global batches of samples (default: train.eval_samples)
    limit: int | None = None  # score at most this many documents of each task
    batch_size: int = 8
    log_samples: bool = False  # keep every document's result in the output's "samples"


def run_harness(source: str | Path, tasks: list[str], options: HarnessOptions = HarnessOptions()) -> dict:
    """simple_evaluate's output for `tasks` on `source` (see the module docstring)."""
    simple_evaluate, hflm, task_manager = _harness()
    with tempfile.TemporaryDirectory(prefix="raylm-eval-") as tmp:
        scratch = Path(tmp)
        paths = [str(Path(options.include_path).expanduser())] if options.include_path else []
        if VAL_TASK in tasks:
            plan = plan_eval(source, options.data, options.batches)
            paths.append(str(write_val_task(scratch, val_texts(plan))))
        manager = _task_manager(task_manager, paths, tasks)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise RaylmError(
                f"--tasks {','.join(unknown)}: no such lm-eval task; use {VAL_TASK}, a task of `lm_eval ls tasks`, "
                f"or pass --include-path DIR holding its YAML"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"  # HFLM's default is cuda
        model = hflm(
            pretrained=str(_model_folder(source, scratch)),
            dtype="float32",
            batch_size=options.batch_size,
            device=device,
        )
        return simple_evaluate(
            model=model,
            tasks=tasks,
            task_manager=manager,
            limit=options.limit,
            log_samples=options.log_samples,
        )


def _task_manager(task_manager, paths: list[str], tasks: list[str]):
    """A TaskManager over `paths`, and over the harness's own tasks only when `tasks` needs one of them (indexing
    its thousands of YAML files takes seconds)."""
    if paths:
        local = task_manager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager(include_path=paths or None)


def harness_eval(source: str | Path, tasks: list[str], options: HarnessOptions = HarnessOptions()) -> dict:
    """The harness's results for `tasks` on `source` as one JSON-able dict."""
    out = run_harness(source, tasks, options)
    results = {
        task: {k: v for k, v in metrics.items() if _is_number(v)} for task, metrics in out["results"].items()
    }
    samples = {task: counts.get("effective") for task, counts in out.get("n-samples", {}).items()}
    return {"source": str(source), "tasks": tasks, "results": results, "samples": samples}


def _is_number(value) -> bool:
    """JSON has no NaN: the harness reports `N/A` standard errors as strings and may report NaN."""
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
