"""Sizes, parsed and printed one way, and the byte constants the rest of the package shares.

Parsing accepts what people write in plans: decimal units (KB, MB, GB, TB: powers of 1000), binary units
(KiB, MiB, GiB, TiB, and K, M, G, T alone: powers of 1024) and bare byte counts. Printing always uses
binary units with one decimal ("1.5GiB"), the way budgets are usually given.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from .errors import PlanError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
FLOAT32_BYTES = 4  # merge math is float32: scratch, factors and GPU tiles are counted in it
IO_BUFFER = 8 * MiB  # the one buffer size for streaming reads, fallback copies and checksums
# Extent-sharing filesystems (XFS reflink, btrfs) clone whole blocks only, at offsets that are equal modulo the
# block size in source and destination. 4 KiB is the block of both by default; a larger block is a multiple of it
# only when the base's data start already agrees, which padding to the base's own length gives.
SHARE_BLOCK = 4 * KiB

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,
}  # fmt: skip


def parse_size(value: Any, key: str) -> int:
    """'2GiB' -> 2147483648; '5GB' -> 5000000000; bare numbers are bytes; K/M/G/T alone are binary.
    Anything else is a PlanError naming `key`."""
    if isinstance(value, bool):
        raise PlanError(f"{key}: expected a size such as 2GiB or 500MB, got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise PlanError(f"{key}: expected a size such as 2GiB or 500MB, got {value!r}")
        number, unit = Fraction(match.group(1)), match.group(2).lower()  # exact, where a float would round
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise PlanError(f"{key}: size must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    """1536 -> '1.5KiB'; below 1 KiB, whole bytes ('512B')."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"
