"""A one-line progress bar on stderr (bytes, tensors, rate, ETA), only when stderr is a terminal."""

from __future__ import annotations

import sys
import threading
import time


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}TB"


class Progress:
    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool | None = None):
        self.total_bytes, self.total_tensors = max(total_bytes, 1), total_tensors
        self.bytes = self.tensors = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = 0.0

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.tensors += tensors
            now = time.monotonic()
            if self.enabled and (now - self._last > 0.25 or self.bytes >= self.total_bytes):
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.bytes / elapsed
        fraction = min(self.bytes / self.total_bytes, 1.0)
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0
        bar = "#" * int(fraction * 24)
        sys.stderr.write(f"\r[{bar:<24}] {fraction:4.0%} {_size(self.bytes)}/{_size(self.total_bytes)} "
                         f"{self.tensors}/{self.total_tensors} tensors {_size(rate)}/s ETA {eta:4.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
