"""Keep freed memory in the process (Linux with glibc).

glibc gives large freed blocks back to the kernel: blocks over its mmap threshold at once, and
the free top of the heap once it passes the trim threshold. A network's activations are such
blocks, so every forward and backward pass gets fresh pages, each zeroed by the kernel on its
first touch (a training step at batch 2, 800x1216 takes about a million page faults). Keeping
them makes such a CPU training step faster (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its 64 MB heap size)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def uses_glibc() -> bool:
    """Whether this process's C library is glibc (on Linux), the malloc this module tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Blocks up to 32 MB come from the heap, and freed heap memory stays in the process up to
    2 GB, instead of going back to the kernel. Process-wide; the command line calls it. Not
    applied where the user already tunes malloc (`GLIBC_TUNABLES` with `glibc.malloc`, or
    `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`) or where the C library is not glibc.
    Returns whether it was applied."""
    if not uses_glibc():
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
