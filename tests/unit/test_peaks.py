"""MFU's denominator: the GPU peak table by device name and precision, unknown GPUs, and the formula."""

import pytest

from raylm.plan.peaks import gpu_peak_flops, mfu


@pytest.mark.parametrize(
    "device_name,precision,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA H200", "fp32", 494.5),
        ("NVIDIA B200", "bf16", 2250.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", 156.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L4", "fp32", 60.0),
    ],
)
def test_known_gpus_get_their_dense_peak_for_the_precision(device_name, precision, tflops):
    assert gpu_peak_flops(device_name, precision) == pytest.approx(tflops * 1e12)


def test_an_unknown_gpu_gets_no_peak_and_mfu_is_null_not_a_guess():
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert mfu(1000.0, 6e6, None) is None


def test_mfu_is_achieved_over_peak():
    assert mfu(2000.0, 3e9, 12e12) == pytest.approx(0.5)
