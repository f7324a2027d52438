"""ZeRO on CPU: give the memory DeepSpeed frees back to the system, so freed parameters and layers leave no heap holes.

ZeRO-3 gathers each layer's full weights and gradients and frees them again every micro-batch, and builds each
layer whole before partitioning it. glibc serves an allocation from its heap once its size is under the mmap
threshold, which it raises after every large free (up to 32 MiB, i.e. every layer of a ~1B-parameter model):
memory freed there mostly stays in the process, and the next differently sized buffers grow the heap instead.
Fixing the threshold maps every buffer of at least MMAP_THRESHOLD bytes on its own and returns it on free
(docs/parallelism.md, "Memory"). ZeRO-1 and 2 free every original parameter once, when `deepspeed.initialize` has
copied them into its flat buffers: trimming the heap once then returns that memory without the fixed threshold's
page faults on every step's buffers.
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


def release_free_heap() -> bool:
    """Return the free memory of glibc's heaps to the system (malloc_trim); False where there is no malloc_trim."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim is not None and trim(0))
