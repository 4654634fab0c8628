"""Everything CUDA in one place: which device a run uses, how much GPU memory its tiles may take, and the
ordering of copies and merge math on the device's streams.

A plan with `device: cpu` never touches torch.cuda, so a CPU-only run does not initialise CUDA.
"""

from __future__ import annotations

import torch

from . import terms
from .config import Plan
from .errors import ShardmergeError

# With max_gpu_memory: auto, tiles may use this share of the GPU memory free when the merge starts; the
# rest is headroom for the CUDA context, the allocator's rounding and the factors.
AUTO_GPU_SHARE = 0.8


def resolve_device(requested: str, local_rank: int = 0) -> str:
    """'cpu' or 'cuda:N' for a plan's `device` (auto | cpu | cuda | cuda:N); a bare cuda (or auto with GPUs
    visible) is the local rank's GPU, so one process per GPU needs no per-rank plan."""
    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "auto":
        return f"cuda:{local_rank % torch.cuda.device_count()}" if available else "cpu"
    if not available:
        raise ShardmergeError(f"device {requested!r} was asked for but CUDA is not available here; use device: cpu")
    index = int(requested.split(":")[1]) if ":" in requested else local_rank % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ShardmergeError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    return f"cuda:{index}"


def tile_budget(plan: Plan, device: str) -> int:
    """The bytes the planner may fill with tiles: max_memory, and on CUDA also max_gpu_memory, since
    there the tiles live in GPU memory too."""
    if not device.startswith("cuda"):
        return plan.max_memory
    gpu = plan.max_gpu_memory
    if gpu == "auto":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        gpu = int(free * AUTO_GPU_SHARE)
    return min(plan.max_memory, gpu)


class Streams:
    """The stream ordering of the CUDA merge, all of it. Two streams: `h2d` copies tiles to the device,
    `compute` makes factors, merges and copies results back. The rules, each kept by one method here:

    - Everything the compute stream reads is made on it or waited for. Factors and the float32 work buffer
      are made on the compute stream itself (`factors`, `empty`), from host tensors the reader thread read,
      so no kernel of the default stream (or of another thread) is ever in their way; a tile copied on
      `h2d` is waited for with `compute.wait_stream(h2d)` before any kernel that reads it is queued.
    - Device memory is freed only to the stream that last used it: the tile allocated on `h2d` is marked
      with `record_stream(compute)`, so the caching allocator does not hand it to the next upload while
      the merge still reads it.
    - A pinned host slab is reused only after its copies finish: its upload precedes the merge (above), and
      the merge's copy back into the slab is followed by an event; the writer waits on that event before it
      writes the slab out and returns it to the pool. A pre-pass tile writes nothing back, so `merge` waits
      for the compute stream before returning and its slab is free when it returns.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)

    def factors(self, term_list: list, host: dict) -> list:
        """Every term's factors, float32 on the device, made on the compute stream from host tensors
        (`host`: TensorInfo -> tensor as stored)."""
        with torch.cuda.stream(self.compute):
            return terms.load_factors(term_list, lambda info: host[info].to(self.device, torch.float32))

    def empty(self, elems: int) -> torch.Tensor:
        """A float32 device buffer owned by the compute stream."""
        with torch.cuda.stream(self.compute):
            return torch.empty(elems, dtype=torch.float32, device=self.device)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """`host` (a pinned slab view) on the device, ordered before anything later queued on the compute stream."""
        with torch.cuda.stream(self.h2d):
            on_device = host.to(self.device, non_blocking=True)
        self.compute.wait_stream(self.h2d)
        on_device.record_stream(self.compute)  # allocated on the copy stream, consumed on the compute one
        return on_device

    def merge(self, raw: torch.Tensor, out: torch.Tensor, merge_rows) -> torch.cuda.Event | None:
        """Merge one host tile: `merge_rows(raw on device)` gives the rounded result (or None for a pre-pass
        tile), which is copied into `out` on the host. Returns the event marking `out` as written; None
        for a pre-pass tile, which is complete (its slab reusable) when this returns."""
        raw = self.upload(raw)
        with torch.cuda.stream(self.compute):
            rounded = merge_rows(raw)
            if rounded is None:
                self.compute.synchronize()
                return None
            out.copy_(rounded, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.compute)
        return ready
