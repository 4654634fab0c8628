"""The progress bar on stderr (bytes, tensors, rate, ETA), through tqdm: a redrawn line on a terminal, a
widget in a notebook, and in a non-terminal log (Slurm, CI) an update every LOG_INTERVAL seconds.

The bar first shows after a delay, so a run that ends (or fails) quickly prints nothing but its summary
or its one error line."""

from __future__ import annotations

import sys
import threading

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between updates when stderr is not a terminal, so logs stay readable
TERMINAL_DELAY = 1.0


class Progress:
    """Advanced from several stage threads; draws only when `enabled`."""

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool = True, label: str = "merge"):
        self.total_tensors, self.tensors = total_tensors, 0
        self._lock = threading.Lock()
        terminal = sys.stderr.isatty()
        self._bar = tqdm(
            total=max(total_bytes, 1),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not enabled,
            mininterval=0.25 if terminal else LOG_INTERVAL,
            delay=TERMINAL_DELAY if terminal else LOG_INTERVAL,
            dynamic_ncols=True,
            desc=label,
        )

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        with self._lock:
            if tensors:
                self.tensors += tensors
                self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()
