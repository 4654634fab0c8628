"""The streaming executor's stage bodies: read tiles, merge them on the device, write them at their planned
offsets, copy untouched tensors, finish shards. The threads and queues are pipeline.py's; the CUDA stream
ordering is cuda.py's.

Five stages joined by bounded queues, so disk reads, merge math, writes, kernel-side copies and
checksums overlap:

    reader --tiles--> merger --tiles--> writer --+
       \\--copy runs--> copier -----------------+--> finisher (fsync, checksum, rename, journal)

Every host buffer is fixed by the plan (mergeplan.Buffers, sized by budget.tile) before anything runs: a
few tile slabs that circulate reader -> merger -> writer (each tile's output is rounded back into its own
slab; on the CPU a local input is read in place, through a mapped window), a float32 scratch for each
thread merging a tile's chunks, and two small fixed buffers. The reader blocks when no slab is free,
so memory does not grow with model size, and reusing slabs means the steady state faults in no pages.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import mergemath, terms
from .cuda import Streams
from .errors import ShardmergeError, os_reason
from .journal import OutputState, commit_shard
from .mergeplan import MergePlan, OutputShard, TensorTask
from .pipeline import Helpers, Pipeline, SlabPool
from .progress import Progress
from .stores import Reader, store_for
from .units import FLOAT32_BYTES

_QUEUE_DEPTH = 4


@dataclass
class StageTimes:
    """Seconds each stage spent working (not waiting); the largest is the bottleneck."""

    read: float = 0.0
    merge: float = 0.0
    write: float = 0.0
    copy: float = 0.0
    hash: float = 0.0


@dataclass
class ExecutionResult:
    stages: StageTimes = field(default_factory=StageTimes)
    shards: dict[str, dict] = field(default_factory=dict)  # name -> {"size", "xxh3_128"}
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_budget: int = 0
    survival: dict[str, list[float]] = field(default_factory=dict)  # merged tensor -> [||kept||^2, ||delta||^2]


class _ShardFile:
    """One output shard being written (unpublished), finished once all its pieces are in."""

    def __init__(self, shard: OutputShard, state: OutputState, pieces: int, runs: list, inputs: dict):
        self.shard, self.pieces = shard, pieces
        self.file = state.create(shard.name, shard.size, [run[:4] for run in runs], inputs)
        self._lock = threading.Lock()

    def piece_done(self) -> bool:
        with self._lock:
            self.pieces -= 1
            return self.pieces == 0


def _write_error(shard_name: str, e: OSError) -> ShardmergeError:
    return ShardmergeError(
        f"{shard_name}: writing the output shard failed: {os_reason(e)}; nothing was marked "
        "complete, "
        "and re-running the same plan resumes"
    )


@dataclass
class _Tile:
    shard: _ShardFile
    task: TensorTask
    r0: int
    r1: int
    prepass: bool
    last: bool
    slab: torch.Tensor | None = None
    # stores.local.Mapped: the tile's input read in place (Buffers.mapped_bytes); None: it is in the slab
    mapped: object = None
    out_bytes: int = 0
    ready: object = None  # a CUDA event the writer waits on
    companions: list = field(default_factory=list)  # (output offset, host tensor): fresh scales the writer writes
    scales: list = field(default_factory=list)  # per quant scale: the tile's rows of a tiled one (in its slab), or None


@dataclass
class _TaskState:
    """What the merger holds for the task whose tiles it is merging."""

    task: TensorTask
    host: dict  # the terms' tensors as the reader read them
    side: list  # a quantized source's whole scales as stored (on the merge device once prepared); None: tiled
    factors: list = field(default_factory=list)
    fresh: list = field(default_factory=list)  # the whole scales requantized, filled tile by tile
    amax: torch.Tensor | None = None  # max |merged| over the tensor, from the pre-pass
    kept_sq: torch.Tensor | float = 0.0  # delta survival: ||round(W + D) - W||^2 so far
    delta_sq: torch.Tensor | float = 0.0  # ||D||^2 so far


class Executor:
    def __init__(self, merge_plan: MergePlan, state: OutputState, rank: int, progress: Progress):
        self.plan, self.state, self.rank, self.progress = merge_plan, state, rank, progress
        self.device = torch.device(merge_plan.device)
        self.cuda = self.device.type == "cuda"
        self.pipeline = Pipeline()
        self.stop = self.pipeline.stop  # set by a signal handler to stop every stage
        buffers = merge_plan.buffers
        self.pool = SlabPool(buffers.slabs, buffers.slab_bytes, self.cuda, self.stop)
        self.work_elems = buffers.work_elems
        self._shared: OrderedDict = OrderedDict()  # TensorInfo -> loaded tensor, least recently used first
        self._shared_used, self._shared_capacity = 0, buffers.shared_bytes
        self.scratch_bytes = buffers.scratch  # the fallback copy buffer and the checksum window
        self.result = ExecutionResult()
        self._inputs: dict[Path, Reader] = {}
        self._inputs_lock = threading.Lock()
        self._open: list[_ShardFile] = []  # created and not yet published: aborted if the run fails
        self.tiles: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        self.writes: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        self.copies: queue.Queue = queue.Queue(64)
        self.finished: queue.Queue = queue.Queue()
        self._counts = threading.Lock()
        self.streams = Streams(self.device) if self.cuda else None

    # -- inputs and counters --------------------------------------------------------------------------
    def _input(self, path: Path) -> Reader:
        with self._inputs_lock:
            if path not in self._inputs:
                self._inputs[path] = store_for(path).open(path, readahead=True)
            return self._inputs[path]

    def _count(self, **deltas) -> None:
        with self._counts:
            for key, value in deltas.items():
                setattr(self.result, key, getattr(self.result, key) + value)

    # -- stages -----------------------------------------------------------------------------------------
    def reader(self, shards: list[OutputShard]) -> None:
        for shard in shards:
            runs = _copy_runs(shard.tasks)
            work = [t for t in shard.tasks if not t.is_copy and t.out_nbytes > 0]
            pieces = len(runs) + sum(len(_row_blocks(t)) for t in work)
            try:
                out = _ShardFile(shard, self.state, pieces + 1, runs, self.plan.inputs[shard.name])
                self._open.append(out)
                out.file.write(shard.header, 0)
            except OSError as e:
                raise _write_error(shard.name, e) from None
            self.progress.advance(len(shard.header))
            for run in runs:
                self.pipeline.put(self.copies, (out, run))
            for task in work:
                self._read_task(out, task)
            if out.piece_done():  # the header was the extra piece
                self.pipeline.put(self.finished, out)
        self.pipeline.put(self.tiles, None)
        self.pipeline.put(self.copies, None)

    def _read_task(self, out: _ShardFile, task: TensorTask) -> None:
        # Only host reads here: the merger makes the factors, so on CUDA they are uploaded on its stream.
        read = self._reader_for(task)
        host = {info: read(info) for t in task.terms for info in t.reads()}
        scales = zip(task.quant.scales, task.tiled) if task.quant is not None else ()
        side = [None if tiled else self._read(s) for s, tiled in scales]
        self.pipeline.put(self.tiles, _TaskState(task, host, side))
        blocks = _row_blocks(task)
        src = task.source
        for prepass in [True, False] if task.prepass else [False]:
            for i, (r0, r1) in enumerate(blocks):
                tile = _Tile(out, task, r0, r1, prepass, last=not prepass and i == len(blocks) - 1)
                tile.slab = self.pool.take()
                start = time.perf_counter()
                nbytes, offset = (r1 - r0) * task.row_bytes, src.offset + r0 * task.row_bytes
                # The plan charges a window per slab; a file its store cannot map (an S3 adapter's
                # modules_to_save tensor) answers None and is read into the slab.
                if self.plan.buffers.mapped_bytes and nbytes:
                    tile.mapped = self._input(src.path).map(offset, nbytes)
                if tile.mapped is None:
                    self._input(src.path).read_into(tile.slab[:nbytes].numpy(), offset)
                nbytes += self._read_scales(tile)
                self.result.stages.read += time.perf_counter() - start
                self._count(bytes_read=nbytes)
                self.pipeline.put(self.tiles, tile)

    def _read_scales(self, tile: _Tile) -> int:
        """The tile's rows of its task's tiled scales, read into its slab behind the data (TensorTask.tile_layout)."""
        task = tile.task
        tile.scales = [None] * len(task.tiled)
        nbytes = 0
        for i, rows, offset in task.tile_layout(tile.r0, tile.r1):
            view = tile.slab[offset : offset + rows.nbytes]
            self._input(rows.path).read_into(view.numpy(), rows.offset)
            tile.scales[i] = view.view(mergemath.TORCH_DTYPES[rows.dtype]).reshape(rows.shape)
            nbytes += rows.nbytes
        return nbytes

    def _reader_for(self, task: TensorTask):
        """`_read` for the task's terms, serving the tensors other tasks read too from a small LRU cache (an
        expert parameter's lora_B would otherwise be read once per expert); only the reader uses it."""
        shared = {info for term in task.terms for info in term.shared_reads()}
        if not shared:
            return self._read

        def load(info) -> torch.Tensor:
            if info not in shared:
                return self._read(info)
            if info in self._shared:
                self._shared.move_to_end(info)
                return self._shared[info]
            tensor = self._read(info)
            size = 4 * info.numel
            if size <= self._shared_capacity:
                while self._shared and self._shared_used + size > self._shared_capacity:
                    self._shared_used -= 4 * self._shared.popitem(last=False)[0].numel
                self._shared[info] = tensor
                self._shared_used += size
            return tensor

        return load

    def _read(self, info) -> torch.Tensor:
        """An adapter tensor read whole (they are small) into host memory, in its stored dtype."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._input(info.path).read_into(buffer.numpy(), info.offset)
        self._count(bytes_read=info.nbytes)
        return buffer.view(mergemath.TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def _factors(self, task: TensorTask, host: dict) -> list:
        """The task's factors in float32 on the merge device, from the tensors the reader read."""
        if self.streams is not None:
            return self.streams.factors(task.terms, host)
        return terms.load_factors(task.terms, lambda info: host[info].to(torch.float32))

    def _prepare(self, state: _TaskState) -> None:
        """Factors, and a quantized source's scales, on the merge device (on CUDA, on the compute stream)."""
        state.factors = self._factors(state.task, state.host)
        with self.streams.computing() if self.streams is not None else contextlib.nullcontext():
            state.side = [None if s is None else s.to(self.device) for s in state.side]
        state.fresh = [None if s is None else s.clone() for s in state.side] if state.task.requant else []

    def merger(self) -> None:
        helpers = Helpers(self.plan.buffers.merge_threads, "merge")
        try:
            self._merge_all(helpers)
        finally:
            helpers.close()

    def _merge_all(self, helpers: Helpers) -> None:
        state = None
        works: list = []  # a float32 scratch per merge thread, made on first use
        while (item := self.pipeline.get(self.tiles)) is not None:
            if isinstance(item, _TaskState):
                state = item
                self._prepare(state)
                continue
            if not works:
                works = (
                    [self.streams.empty(self.work_elems)]
                    if self.streams
                    else [torch.empty(self.work_elems) for _ in range(helpers.count)]
                )
            start = time.perf_counter()
            try:
                self._merge_tile(item, state, works, helpers)
            finally:
                _close_window(item)  # its pages leave our RSS; they stay in the page cache
            if item.last:
                self._finish_task(item, state)
            self.result.stages.merge += time.perf_counter() - start
            if item.prepass:
                self.pool.give(item.slab)
                continue
            self.pipeline.put(self.writes, item)
        self.pipeline.put(self.writes, None)

    def _finish_task(self, tile: _Tile, state: _TaskState) -> None:
        """After the last tile: its fresh scales go with it to the writer; its delta survival is recorded."""
        task = state.task
        if self.streams is not None:
            self.streams.compute.synchronize()  # the fresh scales and sums are computed on that stream
        tile.companions += [(c.out_offset, f.cpu()) for c, f in zip(task.companions, state.fresh) if f is not None]
        if task.terms:
            self._count(tensors_merged=1)
            with self._counts:
                self.result.survival[task.name] = [float(state.kept_sq), float(state.delta_sq)]

    def _merge_tile(self, tile: _Tile, state: _TaskState, works: list, helpers: Helpers) -> None:
        """Merge one tile in float32 and write the rounded result back into the tile's own slab."""
        task, src = tile.task, tile.task.source
        rows = tile.r1 - tile.r0
        data = tile.slab if tile.mapped is None else torch.frombuffer(tile.mapped.view, dtype=torch.uint8)
        raw = data[: rows * task.row_bytes].view(mergemath.TORCH_DTYPES[src.dtype]).reshape(rows, -1)
        tile.out_bytes = rows * task.out_row_bytes
        out = tile.slab[: tile.out_bytes].view(mergemath.TORCH_DTYPES[task.out_dtype]).reshape(rows, -1)
        if self.streams is not None:  # the whole tile at once, on the device
            tile.ready = self.streams.merge(
                raw, out, lambda on_device: self._merge_on_device(tile, state, on_device, works[0])
            )
        else:
            self._merge_chunks(tile, state, raw, out, works, helpers)
        if task.requant and not tile.prepass:  # its rows of the tiled scales, requantized in its slab
            b0 = task.scale_rows(tile.r0, tile.r1)[0]
            tile.companions = [
                (c.out_offset + b0 * c.source.row_bytes, fresh)
                for c, fresh in zip(task.companions, tile.scales)
                if fresh is not None
            ]

    def _scales(self, tile: _Tile, state: _TaskState, rows: list) -> tuple[list, list]:
        """The scales a tile decodes with and requantizes into: `rows`, its rows of the tiled ones, requantized in
        place (a chunk reads its rows before it rewrites them, and no other chunk shares them); the task's whole
        ones."""
        side = [r if r is not None else w for r, w in zip(rows, state.side)]
        fresh = [r if r is not None else f for r, f in zip(rows, state.fresh)] if tile.task.requant else []
        return side, fresh

    def _merge_on_device(self, tile: _Tile, state: _TaskState, raw: torch.Tensor, work_buffer: torch.Tensor):
        """The CUDA path (on the compute stream): the whole tile, its tiled scale rows copied over and back."""
        rows = [None if r is None else r.to(self.device) for r in tile.scales]
        sums = [0.0, 0.0]
        scales = self._scales(tile, state, rows)
        rounded = self._merge_rows(tile, state, scales, raw, work_buffer, 0, tile.r1 - tile.r0, sums)
        state.kept_sq, state.delta_sq = state.kept_sq + sums[0], state.delta_sq + sums[1]
        if rounded is not None and tile.task.requant:
            for host, on_device in zip(tile.scales, rows):
                if host is not None:
                    host.copy_(on_device, non_blocking=True)  # before Streams.merge records the tile's event
        return rounded

    def _merge_chunks(
        self, tile: _Tile, state: _TaskState, raw: torch.Tensor, out: torch.Tensor, works: list, helpers: Helpers
    ) -> None:
        """The CPU path: the tile in cache-sized chunks, each rounded into the slab as soon as it is merged, shared
        by the merge threads where no chunk touches another's bytes."""
        task, rows = tile.task, tile.r1 - tile.r0
        # The output is rounded into the same slab. Walking chunks forward, a chunk's output lands only on
        # input already consumed when an output row is no wider than an input row; when it is wider (bf16 ->
        # float32, FP8 -> bf16), walking backward keeps every chunk's output beyond the input still to be read.
        step = task.chunk_rows
        starts = list(range(0, rows, step))
        if task.out_row_bytes > task.row_bytes:
            starts.reverse()
        # Chunks are independent when each writes only bytes no other chunk reads: its output over its own input
        # (or the input mapped elsewhere), and no shared state (a pre-pass accumulates; a per-tensor scale,
        # from the pre-pass's maximum, is rewritten by every chunk).
        independent = (
            not tile.prepass
            and state.amax is None
            and (tile.mapped is not None or task.out_row_bytes == task.row_bytes)
        )
        parts = [starts[i :: len(works)] for i in range(len(works))] if independent else [starts]
        scales = self._scales(tile, state, tile.scales)
        sums = [[0.0, 0.0] for _ in parts]

        def walk(i: int) -> None:
            for c0 in parts[i]:
                c1 = min(c0 + step, rows)
                self._merge_rows(tile, state, scales, raw, works[i], c0, c1, sums[i], out[c0:c1])

        helpers.run([functools.partial(walk, i) for i in range(len(parts)) if parts[i]])
        state.kept_sq = sum((k for k, _ in sums), state.kept_sq)
        state.delta_sq = sum((d for _, d in sums), state.delta_sq)

    def _merge_rows(
        self,
        tile: _Tile,
        state: _TaskState,
        scales: tuple[list, list],
        raw: torch.Tensor,
        work_buffer: torch.Tensor,
        c0: int,
        c1: int,
        sums: list,
        dest: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Rows c0:c1 of a tile merged in float32 and rounded to the output (requantized for a kept quantized
        format) into `dest`, or into a new tensor when there is none; None in a pre-pass (DoRA column norms, a
        per-tensor scale's maximum). `scales`: the tile's (side, fresh) from `_scales`, whose tiled rows start at
        the tile's, so the codec counts rows from c0. `sums`: the merge thread's delta survival sums, added to."""
        task, q = tile.task, tile.task.quant
        side, fresh = scales
        r0, r1 = tile.r0 + c0, tile.r0 + c1
        work = work_buffer[: (r1 - r0) * task.row_elems].view(r1 - r0, -1)
        work.copy_(raw[c0:c1] if q is None else q.codec.decode(q, raw[c0:c1], side, c0, task.quant_group))
        if tile.prepass:
            if task.column_norms:
                terms.column_pass(task.terms, state.factors, work, r0, r1, task.rows)
            else:
                peak = terms.merge_tile(task.terms, state.factors, work, r0, r1).abs().max()
                state.amax = peak if state.amax is None else torch.maximum(state.amax, peak)
            return None
        # The survival sums need the unmerged base beside the merge, on the rows they are taken over.
        sample = mergemath.sampled_ranges(r0, r1, *task.survival_rows) if task.terms else []
        bases = [work[a - r0 : b - r0].clone() for a, b in sample]
        merged = terms.merge_tile(task.terms, state.factors, work, r0, r1)
        if task.requant:
            self._check_finite(task, merged)  # a requantized format saturates: only the merge itself can fail
            amax = None if state.amax is None else float(state.amax)
            rounded = q.codec.encode(q, merged, fresh, c0, amax, task.quant_group)
            if dest is not None:
                rounded = dest.copy_(rounded)
        else:
            rounded = merged.to(mergemath.TORCH_DTYPES[task.out_dtype]) if dest is None else dest.copy_(merged)
            self._check_finite(task, rounded)  # rounding to the output dtype may overflow to Inf
        if sample:
            kept = q.codec.decode(q, rounded, fresh, c0, task.quant_group) if task.requant else rounded
            for (a, b), base in zip(sample, bases):
                # torch.dist widens a bf16/fp16 operand to float32 exactly before subtracting
                sums[0] += torch.dist(kept[a - r0 : b - r0], base).square()
                sums[1] += torch.dist(merged[a - r0 : b - r0], base).square()
        return rounded

    def _check_finite(self, task: TensorTask, values: torch.Tensor) -> None:
        """safe_merge: the merge, as rounded to the output dtype (which may overflow to Inf), holds no NaN or Inf."""
        if not self.plan.plan.safe_merge:
            return
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            origin = ", ".join(t.origin for t in task.terms) or "dtype conversion"
            raise ShardmergeError(f"{task.name}: merged tensor holds NaN or Inf (safe_merge is on); from {origin}")

    def writer(self) -> None:
        while (tile := self.pipeline.get(self.writes)) is not None:
            if tile.ready is not None:
                tile.ready.synchronize()
            start = time.perf_counter()
            try:
                tile.shard.file.write(
                    tile.slab[: tile.out_bytes].numpy(), tile.task.out_offset + tile.r0 * tile.task.out_row_bytes
                )
            except OSError as e:
                raise _write_error(tile.shard.shard.name, e) from None
            written = tile.out_bytes
            for offset, tensor in tile.companions:
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                try:
                    tile.shard.file.write(data, offset)
                except OSError as e:
                    raise _write_error(tile.shard.shard.name, e) from None
                written += data.nbytes
            self.result.stages.write += time.perf_counter() - start
            self.pool.give(tile.slab)
            self._count(bytes_written=written)
            self.progress.advance(tile.out_bytes, 1 if tile.last else 0)
            if tile.shard.piece_done():
                self.pipeline.put(self.finished, tile.shard)
        self.pipeline.put(self.finished, None)

    def copier(self) -> None:
        while (item := self.pipeline.get(self.copies)) is not None:
            out, (src_path, src_offset, dst_offset, length, count) = item
            start = time.perf_counter()
            try:
                out.file.copy(self._input(src_path), src_offset, dst_offset, length, self.scratch_bytes)
            except OSError as e:
                raise _write_error(out.shard.name, e) from None
            self.result.stages.copy += time.perf_counter() - start
            self._count(tensors_copied=count, bytes_read=length, bytes_written=length)
            self.progress.advance(length, count)
            if out.piece_done():
                self.pipeline.put(self.finished, out)
        self.pipeline.put(self.finished, None)

    def finisher(self) -> None:
        producers = 2  # the writer and the copier each send one None when done
        while producers:
            out = self.pipeline.get(self.finished)
            if out is None:
                producers -= 1
                continue
            start = time.perf_counter()
            name = out.shard.name
            self._open.remove(out)  # from here on commit_shard publishes it or aborts it
            try:
                record = commit_shard(
                    self.state, self.rank, name, out.file, out.shard.size, self.scratch_bytes, self.plan.inputs[name]
                )
            except OSError as e:
                raise _write_error(name, e) from None
            self.result.shards[name] = record.to_json()  # as it travels to rank 0
            self.result.stages.hash += time.perf_counter() - start

    # -- driver ------------------------------------------------------------------------------------------
    def run(self, shards: list[OutputShard]) -> ExecutionResult:
        # No intra-op threads: the merge is memory-bound and chunked to stay in cache, shared out chunk by chunk
        # to the plan's merge threads; OpenMP workers fighting the reader, writer and checksummer cost far more.
        math_threads = torch.get_num_threads()
        if not self.cuda:
            torch.set_num_threads(1)
        try:
            self.pipeline.run([lambda: self.reader(shards), self.merger, self.writer, self.copier, self.finisher])
        finally:
            for reader in self._inputs.values():
                reader.close()
            torch.set_num_threads(math_threads)
            if self.pipeline.failure is not None:
                self._close_queued_windows()
                self._remove_partials()
        self.result.peak_budget = (
            self.pool.made * (self.pool.size + self.plan.buffers.mapped_bytes)
            + FLOAT32_BYTES * self.work_elems * self.plan.buffers.merge_threads
        )
        return self.result

    def _close_queued_windows(self) -> None:
        """A failed run leaves tiles in the queue; their mapped windows (each holding a descriptor of its file)
        are closed now rather than whenever a caller lets go of the exception."""
        while True:
            try:
                item = self.tiles.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Tile):
                _close_window(item)

    def _remove_partials(self) -> None:
        """A failed run frees the disk it held (a full disk is the usual cause) and leaves no partial file."""
        for out in self._open:
            out.file.abort()


def _close_window(tile: _Tile) -> None:
    # Closing unmaps the window even while a tensor still views it (torch.frombuffer holds no export), so
    # no view of it may outlive _merge_tile: the merge reads the window, and writes only to the slab.
    if tile.mapped is not None:
        tile.mapped.close()
        tile.mapped = None


def _row_blocks(task: TensorTask) -> list[tuple[int, int]]:
    rows = task.rows
    step = max(task.rows_per_tile, 1)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _copy_runs(tasks: list[TensorTask]) -> list[tuple[Path, int, int, int, int]]:
    """Untouched tensors as (source file, source offset, output offset, length, tensors), adjacent ones
    coalesced: in an unchanged layout a whole run of norms and projections is one kernel copy."""
    runs: list[list] = []
    for t in tasks:
        if not t.is_copy or t.out_nbytes == 0:
            continue
        src = t.source
        if (
            runs
            and runs[-1][0] == src.path
            and runs[-1][1] + runs[-1][3] == src.offset
            and runs[-1][2] + runs[-1][3] == t.out_offset
        ):
            runs[-1][3] += src.nbytes
            runs[-1][4] += 1
        else:
            runs.append([src.path, src.offset, t.out_offset, src.nbytes, 1])
    return [tuple(r) for r in runs]
