"""The C library functions shardmerge calls through ctypes, which lets go of the GIL for the call (Python's own
mmap.madvise holds it, so a page-in from a cold disk stopped every stage), and the one process setting it
makes: glibc's mmap threshold, pinned so that max_memory holds.

glibc hands a freed block of at least its mmap threshold (128 KiB) back to the system at once. By default
that threshold slides up to the largest block freed so far, so once the first chunk-sized temporary of a
merge is freed, later ones come from the heap, and their freed space stays in the process's RSS: 12-17 MiB
above the plan for DoRA at a 64 MiB budget, measured, and up to 13 MiB more for a second merge thread.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def function(name: str, *argtypes):
    """A libc function taking `argtypes`, or None where the C library has none (not Linux, not glibc)."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    return call


_MALLOPT = function("mallopt", ctypes.c_int, ctypes.c_int)


def pin_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at its starting value for this process (setting it stops the sliding). Where
    the C library has no mallopt (musl, macOS), nothing changes."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
