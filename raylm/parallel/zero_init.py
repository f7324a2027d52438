"""ZeRO-3 holds only its partitions: each layer is partitioned over DP as it is built, and fp32 masters are not copied.

Left to itself, DeepSpeed partitions a ZeRO-3 model inside deepspeed.initialize, after every rank has built and
filled its whole stage unpartitioned (4 bytes per parameter; from dp=4 on, as much as the rank's whole partitioned
state). `layer_partitioner` is the hook `SingleStage` runs on each layer right after building it: it makes the call
DeepSpeed itself makes, `deepspeed.zero.Init(module=...)`, over the same DP group and config, so at most one layer
is ever whole. The partitions start empty: once DeepSpeed's optimizer exists, `Engine.read_weights` writes each
rank's own partition of every fp32 master from the weight source, one parameter at a time, without communication.
`alias_fp32_masters` then keeps DeepSpeed from holding a second fp32 copy of the weights (docs/parallelism.md,
"Memory").
"""

from __future__ import annotations

import os
from collections.abc import Callable

import deepspeed
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

LayerHook = Callable[[nn.Module], None]


def layer_partitioner(ds_config: dict, mpu, partition_group, dtype: torch.dtype) -> LayerHook:
    """A hook that moves one freshly built layer to this rank's device, casts its parameters to `dtype` (what
    deepspeed.initialize would do to the whole model) and partitions them over `partition_group` (the DP group
    of `mpu`, dp x cp under context parallelism)."""
    device = torch.device(
        get_accelerator().device_name(os.environ["LOCAL_RANK"])
    )  # where zero.Init puts them

    def partition(layer: nn.Module) -> None:
        layer.to(device)  # its buffers too: DeepSpeed moves nothing of a model that arrives partitioned
        for param in layer.parameters():
            param.data = param.data.to(dtype)
        deepspeed.zero.Init(
            module=layer,
            data_parallel_group=partition_group,
            dtype=dtype,
            config_dict_or_path=ds_config,
            mpu=mpu,
        )

    return partition


def alias_fp32_masters(ds_optimizer) -> int:
    """fp32 training: make each of ZeRO-3's fp32 master partitions the working-weight partition itself, which holds
    the same values; returns the bytes freed (0 where they already are one, under bf16, or without ZeRO-3).

    DeepSpeed means to share them (its optimizer skips the copy "when dtype and device match") but compares the
    partition's torch.device with a device-name string, never equal, so every rank kept a second fp32 copy of its
    partition: 4 bytes per parameter / dp. The master tensor stays the same object (AdamW's state and DeepSpeed's
    ids are keyed on it); after each step DeepSpeed copies it onto the working partition, now onto itself."""
    freed = 0
    for working, master in zip(
        getattr(ds_optimizer, "fp16_partitioned_groups_flat", []),
        getattr(ds_optimizer, "fp32_partitioned_groups_flat", []),
        strict=True,
    ):
        if (
            working is None
            or master.data_ptr() == working.data_ptr()
            or master.dtype != working.dtype
            or master.device != working.device
            or master.shape != working.shape
        ):
            continue
        freed += master.numel() * master.element_size()
        master.data = working.data
    return freed
