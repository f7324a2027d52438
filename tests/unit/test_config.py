"""Config loading, overrides and every validation rule, each with its exact message."""

import subprocess
import sys

import pytest

from raylm.config import load_config, resolve, to_dict, with_overrides
from raylm.config.loader import describe_fields, parse_override
from raylm.config.schema import Config, field_choices
from raylm.errors import ConfigError
from tests.conftest import TINY_CONFIG


def error_of(overrides, tree=None):
    with pytest.raises(ConfigError) as info:
        resolve(tree or {}, overrides)
    return str(info.value)


def test_tiny_config_loads_and_overrides_parse_as_yaml():
    cfg = load_config(
        TINY_CONFIG, ["parallel.pp=1", "optim.lr=3e-4", "data.paths=[]", "model.tie_embeddings=false"]
    )
    assert cfg.parallel.pp == 1 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.tie_embeddings is False and cfg.data.paths == []
    assert cfg.model.n_layer == 4


def test_with_overrides_accepts_a_mapping_like_tune_does():
    cfg = with_overrides(resolve({}), {"optim.lr": 1e-3, "train.global_batch": 32})
    assert cfg.optim.lr == 1e-3 and cfg.train.global_batch == 32
    assert to_dict(cfg)["optim"]["lr"] == 1e-3


def test_checkpoint_async_is_a_key_though_async_is_a_python_keyword():
    cfg = load_config(TINY_CONFIG, ["checkpoint.async=false"])
    assert cfg.checkpoint.async_save is False and resolve({}).checkpoint.async_save is True
    assert to_dict(cfg)["checkpoint"]["async"] is False and "async_save" not in to_dict(cfg)["checkpoint"]
    assert "checkpoint.async" in [name for name, _, _ in describe_fields()]
    assert with_overrides(cfg, {}) == cfg  # the YAML key travels through to_dict and back
    with pytest.raises(ConfigError, match="unknown config key checkpoint.async_save"):
        load_config(TINY_CONFIG, ["checkpoint.async_save=false"])


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        parse_override("parallel.pp")


def test_every_field_has_a_doc():
    rows = describe_fields()
    assert len(rows) > 50
    assert all(doc for _, doc, _ in rows)
    names = {name for name, _, _ in rows}
    for key in (
        "run.name",
        "run.dir",
        "run.seed",
        "data.paths",
        "data.out_dir",
        "data.vocab_size",
        "data.seq_len",
        "model.n_layer",
        "model.n_head",
        "model.d_model",
        "parallel.pp",
        "parallel.tp",
        "parallel.dp",
        "parallel.zero_stage",
        "parallel.micro_batch",
        "train.max_steps",
        "train.global_batch",
        "train.eval_every",
        "train.precision",
        "optim.lr",
        "schedule.lr.kind",
        "schedule.lr.warmup_steps",
        "schedule.batch.start",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "checkpoint.resume",
        "fault.max_failures",
    ):
        assert key in names


def test_choices_are_declared_once_and_named_in_the_doc():
    """The schema declares each enum-like field's choices (validate checks from there); its doc names them all."""
    docs = {name: doc for name, doc, _ in describe_fields()}
    declared = {key: choices for key, _, choices in field_choices(Config())}
    assert len(declared) == 18
    for key, choices in declared.items():
        assert all(str(choice) in docs[key] for choice in choices), (key, choices, docs[key])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.ppp=2"], "unknown config key parallel.ppp; did you mean parallel.pp?"),
        (["trian.max_steps=2"], "unknown config key trian; did you mean train?"),
        (["parallel.pp=two"], "parallel.pp must be an integer, got 'two' (str); set e.g. parallel.pp=2"),
        (["model.tie_embeddings=3"], "model.tie_embeddings must be true or false, got 3 (int)"),
        (["optim.lr=fast"], "optim.lr must be a number, got 'fast' (str)"),
        (
            ["parallel.pp=2", "parallel.num_workers=3"],
            "parallel.pp * tp * dp = 2 * 1 * 1 = 2 does not match parallel.num_workers=3; change the degrees or set "
            "parallel.num_workers=2",
        ),
        (
            ["model.n_layer=2", "parallel.pp=4"],
            "model.n_layer=2 < parallel.pp=4: every pipeline stage needs at least "
            "one block; lower parallel.pp or add layers",
        ),
        (
            ["model.n_head=4", "parallel.tp=3"],
            "model.n_head=4 is not divisible by parallel.tp=3; pick tp dividing n_head",
        ),
        (
            ["model.d_model=130", "model.n_head=4"],
            "model.d_model=130 is not divisible by model.n_head=4 (130 / 4 = 32.50)",
        ),
        (
            ["model.ffn_hidden=350", "parallel.tp=4"],
            "FFN width 350 (model.ffn_hidden) is not divisible by parallel.tp=4; "
            "set model.ffn_hidden to a multiple of 4",
        ),
        (
            ["model.n_head=24", "model.d_model=192", "parallel.tp=3", "model.ffn_hidden=192"],
            "vocab 2048, padded to 2048, is not divisible by parallel.tp=3; pick tp dividing 2048",
        ),
        (
            ["train.global_batch=10", "parallel.micro_batch=4", "parallel.dp=1"],
            "train.global_batch=10 is not divisible by parallel.micro_batch * dp = 4 * 1 = 4; "
            "set train.global_batch to a multiple of 4, e.g. 8",
        ),
        (
            ["parallel.zero_stage=2", "parallel.pp=2"],
            "parallel.zero_stage=2 with parallel.pp=2: DeepSpeed's pipeline "
            "engine supports ZeRO 0 or 1 only; set parallel.zero_stage=1",
        ),
        (
            ["data.seq_len=512", "model.max_seq_len=256"],
            "data.seq_len=512 is beyond the model's positions "
            "(model.max_seq_len=256); raise model.max_seq_len to >= 512 or lower data.seq_len",
        ),
        (["train.max_steps=0"], "train.max_steps=0 must be positive; set train.max_steps to a value > 0"),
        (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
        (["train.global_batch=-4"], "train.global_batch=-4 must be positive"),
        (["parallel.micro_batch=0"], "parallel.micro_batch=0 must be positive"),
        (
            ["data.paths=['/nonexistent/corpus/*.txt']"],
            "data.paths entry '/nonexistent/corpus/*.txt' matches no file or folder; fix the path or glob",
        ),
        (
            ["run.name=../escape"],
            "run.name='../escape' must be one folder name of letters, digits, '.', '_' and '-'",
        ),
        (["run.name=.."], "run.name='..' must be one folder name of letters, digits"),
        (
            ["data.vocab_size=100"],
            "data.vocab_size=100 is too small for the byte alphabet (256) plus special tokens; "
            "set data.vocab_size >= 259",
        ),
        (["train.precision=fp16"], "train.precision='fp16' is not one of fp32, bf16"),
        (["schedule.lr.kind=step"], "schedule.lr.kind='step' is not one of constant, linear, cosine, wsd"),
        (["checkpoint.resume=maybe"], "checkpoint.resume='maybe' is not one of auto, never, required"),
        (["parallel.grad_comm_dtype=fp16"], "parallel.grad_comm_dtype='fp16' is not one of auto, fp32, bf16"),
        (
            ["schedule.batch.start=6", "schedule.batch.increment=4", "schedule.batch.ramp_tokens=1000"],
            "schedule.batch.start=6 must be a positive multiple of micro_batch * dp = 4",
        ),
        (
            ["schedule.seq_len.start=48", "schedule.seq_len.warmup_steps=10"],
            "schedule.seq_len.start=48 must be data.seq_len=128 divided by a power of two (each sample is cut "
            "into whole windows, doubling to data.seq_len); set it to e.g. 64, 32, 16",
        ),
        (
            ["schedule.seq_len.start=32"],
            "schedule.seq_len.warmup_steps=0 must be positive when the warm-up is on",
        ),
        (
            [
                "schedule.seq_len.start=2",
                "schedule.seq_len.warmup_steps=4",
                "parallel.tp=4",
                "parallel.sequence_parallel=true",
            ],
            "schedule.seq_len.start=2 is not divisible by parallel.tp=4, which parallel.sequence_parallel=true "
            "splits",
        ),
    ],
)
def test_validation_rules_name_the_value_and_the_fix(overrides, message):
    assert message in error_of(overrides)


def test_vocab_padding_is_layout_independent_and_stated():
    cfg = resolve({}, ["data.vocab_size=2000", "parallel.tp=2"])
    from raylm.config.derived import padded_vocab

    assert padded_vocab(cfg.data.vocab_size) == 2048


def test_unreadable_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 4, column 1"):
        load_config(bad)


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of sections, got list"):
        load_config(bad)


def test_cli_prints_one_line_and_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "config", str(TINY_CONFIG), "parallel.tp=3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "raylm: error: model.n_head=4 is not divisible by parallel.tp=3; pick tp dividing n_head"
    ]
    assert "Traceback" not in proc.stderr


def test_cli_config_prints_resolved_yaml_and_help_lists_keys():
    import yaml

    proc = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "config", str(TINY_CONFIG), "parallel.pp=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = yaml.safe_load(proc.stdout)
    assert printed["parallel"]["pp"] == 1 and printed["train"]["max_steps"] > 0
    assert resolve(printed).parallel.pp == 1  # the printed config is itself a valid run config
    help_text = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "config", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "schedule.lr.warmup_steps" in help_text and "steps of linear warmup" in help_text
