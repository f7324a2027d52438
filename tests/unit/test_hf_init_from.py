"""`model.init_from`: a Hugging Face Llama folder as a WeightSource; every TP slice equals the slice of the
original weights, and a folder raylm cannot start from is refused in one line naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raylm.checkpoint.export import export
from raylm.checkpoint.writer import save_full_weights
from raylm.cli import main
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError, ConfigError
from raylm.model.gpt import init_full_weights
from raylm.model.hf_weights import HFWeights, open_folder, open_hf_weights
from raylm.model.weight_source import Shard
from raylm.model.weights import check_init_from, starting_weights

MODEL = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "max_seq_len": 16, "tie_embeddings": False}


def config(*overrides: str):
    """The config as `raylm` commands build it: resolved, then model.init_from's headers checked."""
    tree = {"data": {"vocab_size": 300, "seq_len": 16}, "model": MODEL}
    return check_init_from(resolve(tree, list(overrides)))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """(full raylm weights, an export folder of them)."""
    tmp = tmp_path_factory.mktemp("init_from")
    cfg = config()
    weights = init_full_weights(cfg.model, padded_vocab(300), seed=5)
    save_full_weights(cfg, weights, tmp / "run" / "checkpoints", 2)
    export(tmp / "run", tmp / "hf")
    return weights, tmp / "hf"


def test_every_slice_equals_the_slice_of_the_original(export_dir):
    weights, folder = export_dir
    source = starting_weights(config(f"model.init_from={folder}"))
    assert isinstance(source, HFWeights)
    for name, full in weights.items():
        assert torch.equal(source.read(name), full), name
        for dim in range(full.dim()):
            for count in (2, 4):
                if full.shape[dim] % count or (dim == 0 and "attention.wk" in name and count > 2):
                    continue  # TP never splits a kv head
                for index in range(count):
                    shard = Shard(dim=dim, index=index, count=count)
                    assert torch.equal(source.read(name, shard), shard.of(full)), (name, shard)


def test_config_accepts_a_matching_folder(export_dir):
    _, folder = export_dir
    assert config(f"model.init_from={folder}").model.init_from == str(folder)


def refusal(folder, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        config(f"model.init_from={folder}", *overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.init_from={folder}")
    return message


def copy_of(export_dir, tmp_path):
    return shutil.copytree(export_dir[1], tmp_path / "copy")


def test_shape_mismatch_names_the_first_tensor_and_the_fix(export_dir):
    message = refusal(export_dir[1], "model.d_model=64")
    assert "model.embed_tokens.weight has shape (384, 32) but the model config needs (384, 64)" in message
    assert "model.d_model=32" in message
    message = refusal(export_dir[1], "data.vocab_size=600")
    assert "(640, 32)" in message and "384 rows" in message


def test_same_shapes_other_heads_or_rope_are_refused(export_dir):
    message = refusal(export_dir[1], "model.n_head=8", "model.n_kv_head=4")
    assert "num_attention_heads=4" in message and "model.n_head=4" in message
    assert "rope_theta=10000.0" in refusal(export_dir[1], "model.rope_theta=500.0")
    message = refusal(export_dir[1], "model.n_layer=1")  # the first layer's tensors fit
    assert "num_hidden_layers=2" in message and "model.n_layer=2" in message


def test_tied_run_from_an_untied_folder_is_refused(export_dir):
    assert "tie_word_embeddings=False" in refusal(export_dir[1], "model.tie_embeddings=true")


def test_folder_without_safetensors(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    message = refusal(folder)
    assert "no *.safetensors" in message and "pytorch_model.bin" in message


def test_another_architecture(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    config_json = json.loads((folder / "config.json").read_text())
    config_json.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config_json))
    assert "model_type='gpt2'" in refusal(folder) and "GPT2LMHeadModel" in refusal(folder)


def test_quantized_folders_are_refused(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    config_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config_json, "quantization_config": {"quant_method": "int8"}})
    )
    assert "quantized" in refusal(folder)
    (folder / "config.json").write_text(json.dumps(config_json))
    save_file(
        {"model.embed_tokens.weight": torch.zeros(384, 32, dtype=torch.int8)}, folder / "model.safetensors"
    )
    assert "is I8" in refusal(folder)


def test_truncated_and_missing_folders(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert "truncated" in refusal(folder)
    assert "no such folder" in refusal(tmp_path / "nowhere")


def test_extra_tensors_are_refused(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        open_hf_weights(folder, config().model, padded_vocab(300))


def test_sharded_folder_with_an_index(export_dir, tmp_path):
    weights, folder = export_dir
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, part in parts.items():
        save_file({k: tensors[k] for k in part}, sharded / file, metadata={"format": "pt"})
    weight_map = {k: file for file, part in parts.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert len({info.file for info in open_folder(sharded).tensors.values()}) == 2
    source = starting_weights(config(f"model.init_from={sharded}"))
    assert all(torch.equal(source.read(name), full) for name, full in weights.items())


def test_cli_prints_one_line(export_dir, tmp_path, capsys):
    folder = copy_of(export_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    config_yaml = tmp_path / "c.yaml"
    config_yaml.write_text(json.dumps({"data": {"vocab_size": 300, "seq_len": 16}, "model": MODEL}))
    assert main(["config", str(config_yaml), f"model.init_from={folder}"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no *.safetensors" in err


def test_rope_scaling_must_be_one_raylm_runs_and_match_the_model(export_dir, tmp_path):
    linear = "model.rope_scaling={rope_type: linear, factor: 2.0}"
    message = refusal(export_dir[1], linear)
    assert "rope_scaling={}" in message and "set model.rope_scaling={}" in message
    folder = copy_of(export_dir, tmp_path)
    config_json = json.loads((folder / "config.json").read_text())
    scaled = {**config_json, "rope_scaling": {"type": "linear", "factor": 2.0}}  # transformers' legacy key
    (folder / "config.json").write_text(json.dumps(scaled))
    assert config(f"model.init_from={folder}", linear).model.rope_scaling == {
        "rope_type": "linear",
        "factor": 2.0,
    }
    longrope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}
    (folder / "config.json").write_text(json.dumps({**config_json, "rope_scaling": longrope}))
    assert "'longrope' is not one of linear, llama3, yarn" in refusal(folder)
