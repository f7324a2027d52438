"""The `raylm` command line: parse a verb, load the config with overrides, call one raylm function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from raylm.errors import RaylmError

CONFIG_HELP = "run config YAML (e.g. jobs/configs/tiny.yaml)"
VERBOSE_HELP = "show every Ray, Ray Train and DeepSpeed line on the console (run.log_level=debug)"
OVERRIDES_HELP = (
    "dotted overrides section.key=value, values parsed as YAML (e.g. parallel.pp=2 optim.lr=3e-4)"
)


def _config_epilog() -> str:
    from raylm.config.loader import describe_fields

    rows = describe_fields()
    width = max(len(name) for name, _, _ in rows)
    lines = ["config keys (dotted name, default, meaning):"]
    lines += [f"  {name:<{width}}  {json.dumps(default):<12} {doc}" for name, doc, default in rows]
    return "\n".join(lines)


def _load(args: argparse.Namespace):
    """The config with its overrides (`--verbose` is run.log_level=debug); the console follows its log level."""
    from raylm.config import load_config
    from raylm.log import setup_logging

    verbose = ["run.log_level=debug"] if getattr(args, "verbose", False) else []
    cfg = load_config(args.config, [*args.overrides, *verbose])
    if cfg.model.init_from:  # its headers are read with torch: only when a folder is named
        from raylm.model.weights import check_init_from

        check_init_from(cfg)
    setup_logging(rank=0, verbose=cfg.run.log_level == "debug")
    return cfg


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from raylm.config import to_dict

    print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from raylm.data.prepare import prepare

    summary = prepare(_load(args))
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raylm.train.driver import train
    from raylm.train.startup import StartupMarks

    startup = StartupMarks.from_process_start()
    cfg = _load(args)
    summary = train(
        cfg,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
        force=args.force,
        startup=startup,
    )
    print(json.dumps(summary))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from raylm.plan.command import plan_command

    for line in plan_command(
        _load(args),
        config_path=args.config,
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        gpu=args.gpu,
        gpu_mem_gb=args.gpu_mem,
        json_lines=args.json,
        top=args.top,
        recalibrate=args.recalibrate,
    ):
        try:
            print(line, flush=True)
        except BrokenPipeError:  # `raylm plan ... --json | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            break
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from raylm.tune.sweep import sweep

    summary = sweep(_load(args), args.space, overwrite=args.overwrite, resume=args.resume)
    print(json.dumps(summary))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from raylm.train.generate import GenerateOptions, generate, read_prompt_file

    options = GenerateOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        batch_size=args.batch_size,
    )
    prompts = [args.prompt] if args.prompt_file is None else read_prompt_file(args.prompt_file)
    completions = generate(args.source, prompts, options)
    for completion in completions:  # one prompt: its text; a prompt file: one JSON object per prompt
        print(completion.text if args.prompt_file is None else completion.to_json())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raylm.checkpoint.export import export
    from raylm.train.tracking.after_run import add_export

    summary = export(args.source, args.out_dir)
    add_export(args.source, args.out_dir)  # into the run's MLflow run, when it has one
    print(json.dumps(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        from raylm.harness import HarnessOptions, harness_eval

        options = HarnessOptions(args.include_path, args.data, args.batches, args.limit)
        print(json.dumps(harness_eval(args.source, [t for t in args.tasks.split(",") if t], options)))
        return 0
    from raylm.evaluate import evaluate

    print(json.dumps(evaluate(args.source, data=args.data, split=args.split, batches=args.batches)))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from raylm.compress.apply import CompressOptions, compress
    from raylm.train.tracking.after_run import add_export

    options = CompressOptions(
        source=args.source,
        out_dir=args.out_dir,
        quantize=args.quantize,
        group_size=args.group_size,
        prune=args.prune,
        pattern=args.pattern,
        scope=args.scope,
        dequantize=args.dequantize,
        eval_data=args.eval_data,
    )
    summary = compress(options)
    add_export(args.source, args.out_dir)  # into the run's MLflow run, when it has one
    print(json.dumps(summary))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from raylm.data.cache import verify

    print(json.dumps(verify(args.dir)))
    return 0


def cmd_data_peek(args: argparse.Namespace) -> int:
    from raylm.data.stream import peek

    for row in peek(
        args.dir,
        dp_rank=args.dp_rank,
        dp_size=args.dp_size,
        start=args.start,
        count=args.count,
        seed=args.seed,
        seq_len=args.seq_len,
    ):
        print(json.dumps(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Pre-train GPT-style language models on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def with_config(name: str, func: Callable, help_text: str, **kwargs) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text, **kwargs)
        sub.add_argument("config", help=CONFIG_HELP)
        sub.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        sub.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        sub.set_defaults(func=func)
        return sub

    with_config(
        "config",
        cmd_config,
        "print the fully resolved config as YAML",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    with_config("prepare", cmd_prepare, "tokenize the corpus into verified shards with Ray Data")
    train = with_config("train", cmd_train, "train on the Ray cluster in RAY_ADDRESS, or on a local Ray")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing run folder of the same name"
    )
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though run.seed, the data, the tokenizer or the model shape changed",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="train even when raylm plan predicts the layout does not fit in a rank's memory",
    )

    plan = with_config(
        "plan",
        cmd_plan,
        "predict memory per rank, step time, tokens/s and MFU of every valid layout; print them ranked and "
        "the best layout's overrides",
    )
    plan.add_argument(
        "--gpus", type=int, default=0, help="ranks to plan for (default: the config's pp*tp*dp)"
    )
    plan.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="ranks per node: TP and DP groups inside a node use its fast links (default 8; cpu: --gpus)",
    )
    plan.add_argument(
        "--gpu",
        default="h100",
        metavar="h100|h200|a100|cpu",
        help="hardware: a GPU of raylm's table, or cpu (this machine, measured once and cached)",
    )
    plan.add_argument(
        "--gpu-mem", type=float, default=0.0, metavar="GB", help="memory per GPU instead of the table's"
    )
    plan.add_argument("--json", action="store_true", help="one JSON object per layout instead of the table")
    plan.add_argument("--top", type=int, default=15, help="fitting layouts the table shows (default 15)")
    plan.add_argument(
        "--recalibrate",
        action="store_true",
        help="--gpu cpu: measure this machine again, replacing the cache",
    )

    sweep_help = "search a tune_spaces YAML with Ray Tune, each trial a training run, ASHA early stopping"
    sweep = verbs.add_parser("sweep", help=sweep_help, description=sweep_help)
    sweep.add_argument("config", help=CONFIG_HELP)
    sweep.add_argument(
        "space", help="search space YAML: dotted config key -> distribution (see tune_spaces/)"
    )
    sweep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sweep.add_argument(
        "--overwrite", action="store_true", help="replace an existing sweep folder of the same name"
    )
    sweep.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep (same config and space): "
        "finished and stopped trials stay, the rest resume",
    )
    sweep.set_defaults(func=cmd_sweep)

    gen_help = "continue prompts with a trained run, checkpoint or export (KV-cache decoding)"
    gen = verbs.add_parser(
        "generate",
        help=gen_help,
        description=gen_help + ". Stops at the end-of-text token, a "
        "--stop string or --max-new-tokens. One --prompt prints its text; --prompt-file prints "
        "one JSON object per prompt (prompt, completion, new_tokens, stop_reason).",
    )
    gen.add_argument(
        "source", help="run folder, checkpoint folder or export folder (or an s3://, gs:// prefix)"
    )
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument(
        "--prompt-file", help="text file, one prompt per line (a JSON string line may hold \\n)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add to each prompt")
    gen.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens whose probability reaches p, in (0, 1] (1 = all)",
    )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the new text contains TEXT, cut before it (repeatable)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (each prompt starts from it)")
    gen.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts of a --prompt-file decoded together, left-padded (each prompt's text is its text alone)",
    )
    gen.set_defaults(func=cmd_generate)

    exp = verbs.add_parser("export", help="write a checkpoint as a Hugging Face Llama folder (safetensors)")
    exp.add_argument(
        "source",
        help="checkpoint folder (<run>/checkpoints/step-XXXXXXXX) or run folder (its newest "
        "committed checkpoint), or such an s3://, gs:// prefix",
    )
    exp.add_argument(
        "out_dir",
        help="folder (or s3://, gs:// prefix) for model.safetensors, config.json and tokenizer.json",
    )
    exp.set_defaults(func=cmd_export)

    ev_help = (
        "loss and perplexity of a run, checkpoint or export on a prepared split, or lm-evaluation-harness "
        "tasks (--tasks), as one JSON line"
    )
    ev = verbs.add_parser("eval", help=ev_help, description=ev_help)
    ev.add_argument(
        "source",
        help="run folder (its newest committed checkpoint), checkpoint folder or export folder "
        "(or an s3://, gs:// prefix)",
    )
    ev.add_argument(
        "--data",
        default=None,
        help="prepared data folder (default: the run's data.sources or "
        "data.out_dir); must use the model's tokenizer",
    )
    ev.add_argument("--split", default="val", choices=("val", "train"), help="which split to score")
    ev.add_argument(
        "--batches",
        type=int,
        default=None,
        help="global batches of train.global_batch samples "
        "(default: the run's own evaluation, train.eval_samples; also raylm_val's samples)",
    )
    ev.add_argument(
        "--tasks",
        default=None,
        metavar="NAME[,NAME]",
        help="run lm-evaluation-harness tasks instead (pip install 'lm-eval[hf]'): raylm_val (the validation "
        "split, local) or any harness task; prints the harness's metrics as one JSON line",
    )
    ev.add_argument(
        "--include-path", default=None, metavar="DIR", help="--tasks: a folder of your own task YAMLs"
    )
    ev.add_argument(
        "--limit", type=int, default=None, help="--tasks: score at most this many documents of each task"
    )
    ev.set_defaults(func=cmd_eval)

    comp_help = "quantize (int8, int4) and/or prune the linear layers of a run, checkpoint or export"
    comp = verbs.add_parser(
        "compress",
        help=comp_help,
        description=comp_help + "; writes an export folder that "
        "eval and generate read and prints one JSON line (see docs/compression.md)",
    )
    comp.add_argument("source", help="run folder, checkpoint folder or export folder")
    comp.add_argument("out_dir", help="folder for the compressed export (not SOURCE)")
    comp.add_argument(
        "--quantize",
        default=None,
        metavar="int8|int4",
        help="weight-only, compressed-tensors format (transformers and vLLM load it): int8 one scale per "
        "output row, int4 one scale per --group-size columns",
    )
    comp.add_argument(
        "--group-size", type=int, default=128, help="int4: input columns per scale (default 128)"
    )
    comp.add_argument(
        "--prune",
        type=float,
        default=None,
        metavar="FRACTION",
        help="magnitude-prune this fraction of each linear layer's weights, in [0, 1)",
    )
    comp.add_argument(
        "--pattern",
        default="unstructured",
        help="unstructured (default) or 2:4 (the 2 largest of every 4 input columns; --prune 0.5)",
    )
    comp.add_argument(
        "--scope",
        default="layer",
        help="unstructured pruning: layer (each layer loses FRACTION; "
        "default) or global (one threshold over all layers)",
    )
    comp.add_argument(
        "--dequantize",
        action="store_true",
        help="write a quantized folder back as float weights (for model.init_from)",
    )
    comp.add_argument(
        "--eval-data",
        default=None,
        metavar="DIR",
        help="prepared data folder: add val loss and perplexity before and after to the line",
    )
    comp.set_defaults(func=cmd_compress)

    data = verbs.add_parser("data", help="inspect prepared data").add_subparsers(
        dest="data_verb", required=True
    )
    verify = data.add_parser("verify", help="check every shard against manifest.json")
    verify.add_argument("dir", help="prepared data folder (data.out_dir)")
    verify.set_defaults(func=cmd_data_verify)
    peek = data.add_parser("peek", help="print the samples one DP rank would train on, one JSON line each")
    peek.add_argument("dir", help="prepared data folder (data.out_dir)")
    peek.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank")
    peek.add_argument("--dp-size", type=int, default=1, help="data-parallel size")
    peek.add_argument("--start", type=int, default=0, help="skip this many of the rank's samples")
    peek.add_argument("--count", type=int, default=4, help="samples to print")
    peek.add_argument("--seed", type=int, default=1234, help="run.seed of the run")
    peek.add_argument("--seq-len", type=int, default=None, help="data.seq_len (default: the manifest's)")
    peek.set_defaults(func=cmd_data_peek)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raylm` console script; user errors become one stderr line and a non-zero exit."""
    from raylm.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(rank=0)
    try:
        return args.func(args)
    except RaylmError as exc:
        print(f"raylm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
