"""The plumbing under the executor: bounded queues, one stop signal, stage threads, the helper threads that
share one stage's work, and the pool of tile buffers. No merge logic lives here.

Every blocking call polls the stop signal, so when one stage fails (or a signal asks us to stop) every
other stage leaves its loop within one poll interval, and the first failure is what the caller sees.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable

import torch

POLL_SECONDS = 0.1


class Stopped(Exception):
    """Raised inside a stage when another stage failed or a signal asked us to stop."""


class Pipeline:
    """Stages (functions run on their own threads) joined by bounded queues, with one stop signal."""

    def __init__(self):
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def put(self, q: queue.Queue, item) -> None:
        """Put `item`, waiting for room for as long as no stage has stopped."""
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                q.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue):
        """The next item, waiting for as long as no stage has stopped."""
        while True:
            try:
                return q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped from None

    def _thread(self, body: Callable[[], None]) -> threading.Thread:
        def run():
            try:
                body()
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which re-raises it
                if self.failure is None:
                    self.failure = e
                self.stop.set()

        return threading.Thread(target=run, name=getattr(body, "__name__", "stage"), daemon=True)

    def run(self, stages: list[Callable[[], None]]) -> None:
        """Run every stage to its end; re-raise the first failure. The main thread only joins, so that it
        stays free to take signals (whose handlers set `stop`)."""
        threads = [self._thread(body) for body in stages]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(POLL_SECONDS)
        finally:
            self.stop.set()
            for t in threads:
                t.join()
        if self.failure is not None:
            raise self.failure


class Helpers:
    """`count` threads (the caller's and count - 1 helpers) that share one stage's work piece by piece."""

    def __init__(self, count: int, name: str):
        self.count = count
        self._pool = concurrent.futures.ThreadPoolExecutor(count - 1, thread_name_prefix=name) if count > 1 else None

    def run(self, parts: list[Callable[[], None]]) -> None:
        """Run parts[0] on the caller's thread and the others on helpers; return once every part has ended (a
        part may be using buffers the caller frees next), re-raising the first failure."""
        futures = [self._pool.submit(part) for part in parts[1:]] if self._pool is not None else []
        try:
            parts[0]()
        finally:
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class SlabPool:
    """The tile buffers: at most `count` slabs of `size` bytes, made on first use and then reused, so
    the steady state allocates nothing (fresh pages cost more than the merge math) and memory is capped."""

    def __init__(self, count: int, size: int, pin: bool, stop: threading.Event):
        self.count, self.size, self.pin, self.stop = count, size, pin, stop
        self.made = 0
        self.free: queue.Queue = queue.Queue()

    def take(self) -> torch.Tensor:
        if self.free.empty() and self.made < self.count:
            self.made += 1
            return torch.empty(self.size, dtype=torch.uint8, pin_memory=self.pin)
        while True:
            try:
                return self.free.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped from None

    def give(self, slab: torch.Tensor) -> None:
        self.free.put(slab)
