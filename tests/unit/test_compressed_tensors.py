"""`raylm compress --quantize` as the ecosystem reads it: compressed-tensors' own unpacking gives raylm's integers
back, transformers loads the int8 and int4 folders with every tensor used and raylm's dequantized logits, and a
quantized layout raylm cannot read is refused in one line, never read as something else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from test_hf_export import RTOL, exported, raylm_model
from transformers import AutoModelForCausalLM

from raylm.checkpoint.export import load_export, open_export
from raylm.compress.apply import CompressOptions, compress
from raylm.errors import CheckpointError
from raylm.model.quantized import pack, unpack


@pytest.mark.parametrize("bits", [8, 4])
def test_packing_is_the_librarys(bits):
    """raylm's words are compressed-tensors' words, bit for bit, and unpack both ways."""
    low = -(2 ** (bits - 1))
    q = torch.randint(low, -low, (6, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack(packed, bits, 96), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([6, 96])), q)


@pytest.mark.parametrize(
    "method,tie", [("int8", True), ("int4", False)], ids=["int8-tied", "int4-group32-untied"]
)
def test_transformers_loads_the_quantized_export(tmp_path, method, tie):
    cfg, weights, folder = exported(tmp_path, tie)
    out = tmp_path / method
    compress(CompressOptions(source=str(folder), out_dir=str(out), quantize=method, group_size=32))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), (
        info
    )  # every stored tensor used: none missing (newly initialized) or unknown
    _, dequantized = load_export(out)  # what raylm eval and generate run
    idx = torch.randint(0, cfg.data.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = raylm_model(cfg, dequantized)(idx)  # (B, T, padded vocab)
        got = hf(idx).logits
        unquantized = raylm_model(cfg, weights)(idx)
    assert ((got - want).abs().max() / want.abs().max()).item() < RTOL
    assert ((unquantized - want).abs().max() / want.abs().max()).item() > 10 * RTOL  # quantized, not float
    q_proj = hf.model.layers[0].self_attn.q_proj.weight  # decompressed by the forward pass
    wq = dequantized["layers.0.attention.wq.weight"]
    assert q_proj.shape == wq.shape and not torch.equal(q_proj, weights["layers.0.attention.wq.weight"])


def refusal(folder) -> str:
    with pytest.raises(CheckpointError) as err:
        open_export(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_layouts_raylm_cannot_read_are_refused(tmp_path):
    _, _, folder = exported(tmp_path, tie=True)
    out = tmp_path / "q4"
    compress(CompressOptions(source=str(folder), out_dir=str(out), quantize="int4", group_size=32))
    config = json.loads((out / "config.json").read_text())

    def with_quantization(**changes) -> str:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out, copy)
        qc = json.loads(json.dumps(config["quantization_config"]))
        for dotted, value in changes.items():
            *path, key = dotted.split("__")
            node = qc
            for part in path:
                node = node[part]
            node[key] = value
        (copy / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        return refusal(copy)

    assert "format 'naive-quantized'" in with_quantization(format="naive-quantized")
    assert "symmetric=False" in with_quantization(config_groups__group_0__weights__symmetric=False)
    assert "num_bits=2" in with_quantization(config_groups__group_0__weights__num_bits=2)
    assert "activation quantization" in with_quantization(
        config_groups__group_0__input_activations={"num_bits": 8, "type": "int"}
    )
    message = with_quantization(quant_method="raylm", bits=4)
    assert "older raylm compress" in message and "compress the unquantized export again" in message
    assert "load this folder with transformers or vLLM" in with_quantization(quant_method="awq")
