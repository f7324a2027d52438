"""Host buffers a background save copies the engine's state into, kept from one save to the next.

A background save's snapshot is the only part of it that stops training. Copying into memory already mapped
costs a plain memory copy (about 0.1 s per GB on one core); fresh tensors at every save first fault in every page
(about five times that). At most one save is in flight and a save starts only after the one before it has
committed, so by then nothing reads the buffers and they can be overwritten. The price: the host memory of one
snapshot (12 bytes per parameter of the layers a rank writes) stays held between saves instead of coming and going.
"""

from __future__ import annotations

import torch


class HostCopies:
    """copy(key, tensor) -> a CPU fp32 copy of `tensor` in the buffer kept under `key` (made at its first use,
    pinned when the tensor is on a GPU, so the copy runs at the bus's speed)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape:
            buffer = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=tensor.is_cuda)
            self.buffers[key] = buffer
        return buffer.copy_(tensor.detach())

    def nbytes(self) -> int:
        """The host memory the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
