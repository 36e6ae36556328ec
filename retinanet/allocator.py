"""The one owner of glibc's malloc settings (Linux with glibc; a no-op elsewhere).

Two workloads want opposite things, so there are two modes, each process-wide:

- `keep_freed_memory` (what every command starts in; the command line sets it): blocks up to
  32 MB come from the heap and freed heap memory stays in the process up to 2 GB. A network's
  activations are freed and allocated again every pass; glibc would otherwise hand them back
  to the kernel and take fresh pages, each zeroed on first touch (a training step at batch 2,
  800x1216 takes about a million page faults). Keeping them makes a CPU training step faster
  (benchmarks/RESULTS.md).
- `return_freed_memory` (set when a process starts reading a raster window by window, and by
  the HTTP service): blocks of 1 MiB and more are mmapped and go back to the kernel when freed,
  and the heap is trimmed at glibc's default 128 KiB. Tile-sized buffers and decoded uploads
  differ from one to the next; kept on the heap they fragment it, and a tiled pass over a very
  large GeoTIFF or a server after one large request would stay gigabytes larger.

Neither mode is applied where the user tunes malloc themselves (`GLIBC_TUNABLES` with
`glibc.malloc`, or `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`): their settings win.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP = {M_MMAP_THRESHOLD: 32 << 20,  # the largest glibc accepts on 64-bit (half its 64 MB heap size)
        M_TRIM_THRESHOLD: 2**31 - 1}  # mallopt takes an int
RETURN = {M_MMAP_THRESHOLD: 1 << 20,  # a fixed value also stops glibc raising it after a large free
          M_TRIM_THRESHOLD: 128 << 10}  # glibc's own default


def uses_glibc() -> bool:
    """Whether this process's C library is glibc (on Linux), the malloc this module tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def user_tunes_malloc() -> bool:
    """Whether the user set glibc's malloc parameters through the environment."""
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))


def keep_freed_memory() -> bool:
    """Freed memory stays in the process (see the module docstring). Returns whether it was applied."""
    return _apply(KEEP)


def return_freed_memory() -> bool:
    """Large freed blocks go back to the kernel (see the module docstring). Returns whether it was applied."""
    return _apply(RETURN)


def _apply(settings: dict[int, int]) -> bool:
    if not uses_glibc() or user_tunes_malloc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(parameter, value) == 1 for parameter, value in settings.items()])
