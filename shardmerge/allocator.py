"""The C allocator's share of max_memory.

glibc hands a freed block of at least its mmap threshold (128 KiB) back to the system at once. By default
that threshold slides up to the largest block freed so far, so once the first chunk-sized temporary of a
merge is freed, later ones come from the heap, and their freed space stays in the process's RSS: 12-17 MiB
above the plan for DoRA at a 64 MiB budget, measured, and up to 13 MiB more for a second merge thread.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def pin_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at its starting value for this process (setting it stops the sliding). Where
    the C library has no mallopt (musl, macOS), nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
