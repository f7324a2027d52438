"""ZeRO on CPU: serve large host allocations straight from mmap, so freed parameters and layers leave no heap holes.

ZeRO-1 and 2 copy every parameter into DeepSpeed's flat buffers and free the originals; ZeRO-3 gathers each layer's
full weights and gradients and frees them again every micro-batch, and builds each layer whole before partitioning
it. glibc serves an allocation from its heap once its size is under the mmap
threshold, which it raises after every large free (up to 32 MiB, i.e. every layer of a ~1B-parameter model):
memory freed there mostly stays in the process, and the next differently sized buffers grow the heap instead.
Fixing the threshold maps every buffer of at least MMAP_THRESHOLD bytes on its own and returns it on free
(docs/parallelism.md, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20  # bytes: a (d_model,) row is far below, a d_model x d_model layer far above


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold))
