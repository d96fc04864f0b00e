"""Keep large tensors on glibc's heap: the biggest single speed lever for large systems on CPU.

By default glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB once
it adapts) with fresh pages from the kernel and returns them on free. An MD step on thousands of
atoms allocates and frees many edge tensors of tens to hundreds of MiB, so each step page-faults
and the kernel zero-fills all of that memory again. Measured here (NequIP small, f32, 4000-atom Cu,
1 thread, ASE MD): 1251 ms/step by default, 553 ms/step with large blocks served from a heap that
is not trimmed; peak RSS 1.7 -> 2.4 GB, because freed memory stays with the process for reuse.
(The peer packages speed up the same way when their users set MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ before starting Python; benchmarks/README.md reports both.)

This is process-wide: it changes how fast memory is recycled, never a result. The calculator and
the training loop call ``reuse_freed_memory()``; ``MLIP_REUSE_MEMORY=0`` in the environment turns
it off (e.g. when many processes share a node's memory). Other C libraries (musl, macOS): no-op.
"""

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # bytes: blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # bytes: free memory at the top of the heap is kept up to ~2 GiB


def reuse_freed_memory() -> bool:
    """Tell glibc to recycle large freed blocks instead of unmapping them. True if applied.

    Idempotent: calling it again sets the same two values."""
    if os.environ.get("MLIP_REUSE_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process' own symbols: glibc's mallopt, no library search
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD)) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)) == 1
