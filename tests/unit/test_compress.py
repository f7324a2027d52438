"""`raylm compress`: torchao's int8/int4 rounding stored in compressed-tensors' format and read back by eval and
generate, magnitude pruning (layer, global, 2:4) with masks, the JSON line, and one line for every bad input.
tests/unit/test_compressed_tensors.py loads the same folders with compressed-tensors and transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_data_support import prepared
from test_hf_eval import fresh_log_handler  # noqa: F401  (autouse: main's log handler per test)

from raylm.checkpoint.export import export, load_export, open_export
from raylm.checkpoint.writer import save_full_weights
from raylm.cli import main
from raylm.compress.prune import CompressError, prune_masks, two_four_mask
from raylm.compress.quantize import _torchao, quantize
from raylm.config import resolve
from raylm.config.derived import padded_vocab
from raylm.errors import CheckpointError, ConfigError
from raylm.model.gpt import init_full_weights
from raylm.model.quantized import dequantize, pack


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(weights, export folder, data folder) of a small trained-looking model whose export has the tokenizer."""
    tmp = tmp_path_factory.mktemp("compress")
    data = prepared(tmp)
    cfg = resolve(
        {
            "data": {"out_dir": str(data), "vocab_size": 320, "seq_len": 16},
            "model": {
                "n_layer": 2,
                "n_head": 4,
                "n_kv_head": 2,
                "d_model": 64,
                "max_seq_len": 64,
                "tie_embeddings": False,
            },
            "parallel": {"micro_batch": 2},
            "train": {"global_batch": 8, "eval_batches": 2},
        }
    )
    gen = torch.Generator().manual_seed(2)
    weights = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in init_full_weights(cfg.model, padded_vocab(320), seed=1).items()
    }
    save_full_weights(cfg, weights, tmp / "run" / "checkpoints", 6)
    export(tmp / "run", tmp / "dense")
    return weights, tmp / "dense", data


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["compress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_stored_form_equals_torchao_dequantized():
    """Packed and dequantized by raylm, each matrix is exactly torchao's dequantized weight."""
    quantize_, config, per_axis, per_group = _torchao()
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    for method, bits, granularity, dtype in (
        ("int8", 8, per_axis(0), torch.int8),
        ("int4", 4, per_group(64), torch.int4),
    ):
        linear = torch.nn.Linear(256, 48, bias=False)
        linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        quantize_(torch.nn.Sequential(linear), config(weight_dtype=dtype, granularity=granularity))
        stored = quantize(weight, method, 64)
        assert stored.q.shape == (48, 256) and stored.scales.shape == (48, 1 if bits == 8 else 4)
        packed = pack(stored.q, bits)
        assert packed.shape == (48, 256 * bits // 32)
        assert torch.equal(dequantize(packed, stored.scales, 256, bits), linear.weight.dequantize())


def test_masks_keep_the_largest_weights():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 16, generator=gen), "b": 3 * torch.randn(4, 8, generator=gen)}
    layer = prune_masks(weights, 0.25, "unstructured", "layer")
    for name, mask in layer.items():
        assert int((~mask).sum()) == weights[name].numel() // 4
        assert weights[name].abs()[~mask].max() <= weights[name].abs()[mask].min()
    pruned = prune_masks(weights, 0.5, "unstructured", "global")
    kept = torch.cat([weights[n].abs()[m] for n, m in pruned.items()])
    gone = torch.cat([weights[n].abs()[~m] for n, m in pruned.items()])
    assert (
        gone.numel() == 80
        and gone.max() <= kept.min()
        and pruned["b"].float().mean() > pruned["a"].float().mean()
    )
    two_four = prune_masks(weights, 0.5, "2:4", "layer")["a"]
    assert (two_four.view(8, 4, 4).sum(-1) == 2).all()
    with pytest.raises(CompressError, match="layers.0.x.weight has 6 input columns"):
        two_four_mask("layers.0.x.weight", torch.randn(4, 6))


def test_quantized_folders_load_in_eval_and_generate(model, tmp_path, capsys):
    weights, dense, data = model
    code, out, err = run_cli(
        capsys, str(dense), str(tmp_path / "q8"), "--quantize", "int8", "--eval-data", str(data)
    )
    assert code == 0 and out.count("\n") == 1, err
    row = json.loads(out)
    assert row["parameters"] == sum(t.numel() for t in weights.values())
    assert row["bytes_before"] == 4 * row["parameters"] and row["sparsity"] == 0.0
    head = weights["output.weight"].numel()
    float_bytes = 4 * (
        row["parameters"] - row["linear_parameters"] + head
    )  # embedding, head and norms stay fp32
    assert float_bytes < row["bytes_after"] < float_bytes + (row["linear_parameters"] - head) * 1.1  # int8
    assert (
        row["ppl_ratio"] == pytest.approx(row["ppl_after"] / row["ppl_before"])
        and abs(row["ppl_ratio"] - 1) < 0.01
    )
    _, restored = load_export(tmp_path / "q8")  # dequantized, raylm's layout and names
    for name, w in weights.items():
        quantized = w.dim() == 2 and name not in ("tok_embeddings.weight", "output.weight")
        scale = w.abs().amax(dim=-1, keepdim=True) / 127.5 if quantized else 0
        assert ((restored[name] - w).abs() <= scale / 2 + 1e-6).all(), name
    code, out, _ = run_cli(
        capsys, str(dense), str(tmp_path / "q4"), "--quantize", "int4", "--group-size", "32"
    )
    q4 = json.loads(out)
    assert (
        code == 0 and q4["bytes_after"] < float_bytes + (row["linear_parameters"] - head) * 0.7
    )  # 4 bits + scales
    assert q4["group_size"] == 32
    assert main(["eval", str(tmp_path / "q4"), "--data", str(data)]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])
    assert main(["generate", str(tmp_path / "q4"), "--prompt", "def f(", "--max-new-tokens", "4"]) == 0
    assert main(["compress", str(tmp_path / "q4"), str(tmp_path / "back"), "--dequantize"]) == 0
    capsys.readouterr()
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert torch.equal(
        load_export(tmp_path / "back")[1]["layers.1.feed_forward.w2.weight"],
        load_export(tmp_path / "q4")[1]["layers.1.feed_forward.w2.weight"],
    )


def test_pruned_folder_has_masks_and_zeros(model, tmp_path, capsys):
    _, dense, _ = model
    code, out, _ = run_cli(capsys, str(dense), str(tmp_path / "p"), "--prune", "0.5", "--pattern", "2:4")
    assert code == 0 and json.loads(out)["sparsity"] == 0.5
    _, source = open_export(tmp_path / "p")
    _, state = load_export(tmp_path / "p")
    masks = {n: source.read_mask(n) for n in source.shapes if source.read_mask(n) is not None}
    assert len(masks) == 2 * 7 + 1  # every linear layer, the untied head too; never the embedding or norms
    for name, mask in masks.items():
        assert torch.equal(state[name] != 0, mask), name
    code, out, _ = run_cli(capsys, str(tmp_path / "p"), str(tmp_path / "p8"), "--quantize", "int8")
    assert code == 0 and (tmp_path / "p8" / "masks.safetensors").is_file()  # a pruned folder keeps its masks


def test_bad_inputs_get_one_line(model, tmp_path, capsys):
    _, dense, _ = model
    cases = [
        (["--quantize", "fp8"], "--quantize 'fp8' is not a quantization method"),
        (["--prune", "0.5", "--pattern", "3:4"], "--pattern '3:4' is not a pruning pattern"),
        (["--prune", "1"], "--prune 1.0 is outside [0, 1)"),
        (["--prune", "-0.1"], "outside [0, 1)"),
        (["--prune", "0.5", "--scope", "model"], "--scope 'model' is not a pruning scope"),
        (
            ["--quantize", "int4", "--group-size", "48"],
            "does not divide the input width 64 of layer model.layers.0.self_attn.q_proj.weight",
        ),
        ([], "nothing to do"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, str(dense), str(tmp_path / "x"), *args)
        assert code == CompressError.exit_code and not out and err.count("\n") == 1 and message in err, (
            args,
            err,
        )
    assert run_cli(capsys, str(dense), str(tmp_path / "q"), "--quantize", "int8")[0] == 0
    code, _, err = run_cli(capsys, str(tmp_path / "q"), str(tmp_path / "qq"), "--quantize", "int4")
    assert code == CompressError.exit_code and "already quantized" in err and "--dequantize" in err
    code, _, err = run_cli(capsys, str(dense), str(tmp_path / "y"), "--dequantize")
    assert code == CompressError.exit_code and "nothing to dequantize" in err
    code = main(["config", "jobs/configs/tiny.yaml", f"model.init_from={tmp_path / 'q'}"])
    err = capsys.readouterr().err
    assert code in (ConfigError.exit_code, CheckpointError.exit_code) and err.count("\n") == 1
    assert "cannot start training" in err and f"raylm compress {tmp_path / 'q'} OUT --dequantize" in err
