"""The memory budget: what a run holds besides its buffers, and the rows per tile (and per cache-sized chunk)
of every merged tensor, chosen so that every buffer the executor holds, fixed here as Buffers, fits
max_memory together.
"""

from __future__ import annotations

import math
import mmap
import os

from .errors import ShardmergeError
from .mergeplan import SLAB_ALIGN, Buffers, MergePlan, TensorTask
from .safetensors_io import DTYPE_SIZES
from .stores import location, store_for
from .units import FLOAT32_BYTES, IO_BUFFER, KiB, MiB, format_size

# What a run holds besides its planned buffers, measured as peak RSS above an idle `import torch, shardmerge`:
# modules imported on first use (yaml, xxhash, the planner and executor: 3 MiB), the pages of torch's library
# code that the merge kernels run (file-backed RSS: up to 10 MiB for a float32 DoRA merge of embeddings), five
# stage threads (stacks and glibc arenas), allocator slack, and the plan of a model of up to PLAN_TENSORS
# tensors (405B dense has ~1.1k): up to 13.6 MiB in all, measured. Each tensor beyond that adds its headers,
# TensorInfo and TensorTask objects (~1.2 KiB measured; MoE models have ~100k tensors, so this is real memory).
RUNTIME_BYTES = 16 * MiB
PLAN_TENSORS = 1024
PER_TENSOR_BYTES = 2 * KiB

SLABS = 4  # one being read, one merging, one being written, one spare for jitter
# The CPU merge walks a tile in chunks of about 1 MiB of float32, so that widening, the low-rank update
# and rounding all happen while the chunk is in cache: memory traffic drops from ~20 to ~4 bytes per weight.
CHUNK_ELEMS = 256 * 1024

# Float32 chunk-sized temporaries: delta survival keeps the base and the rounded result beside the merge;
# decoding and encoding a quantized chunk (unpacked codes, scales per element, absolute values) takes four.
_SURVIVAL_WORK = 2
_MAPPED_ROOM = SLABS * 32 * MiB  # the buffers' room from which tiles are read in place
_CODEC_WORK = 4
# The CPU merge is the one stage that needs more than a core's worth of work per byte; its chunks are shared
# by up to this many threads, each with its own scratch, as long as the extra threads take at most
# 1/_THREADS_SHARE of the budget (a tighter one keeps its room for tiles). More cores go to the other stages.
MERGE_THREADS = 4
_THREADS_SHARE = 8
# What each merge thread beyond the first adds to peak RSS besides its scratch (its stack, glibc arena, allocator
# slack): measured 2.4 MiB at a 128 MiB budget (5.8 GB model, one 5 GB shard), two threads against one, with the
# mmap threshold pinned (libc.py; 13 MiB without).
_THREAD_SLACK = 4 * MiB


def tile(merge_plan: MergePlan, budget: int) -> Buffers:
    """Choose rows per tile (and per cache-sized chunk) for every tensor that is not a plain copy, and
    the buffers that implies. The budget arithmetic is one piece: each reservation below feeds the next, and
    tests/test_budget.py checks the whole against max_memory."""
    overhead = _overhead(merge_plan)
    budget = min(budget, merge_plan.plan.max_memory - overhead)  # what the buffers below may use on the host
    scratch = scratch_bytes(budget)
    tasks = [t for s in merge_plan.shards for t in s.tasks if not t.is_copy and t.out_nbytes > 0]
    if not tasks:
        return Buffers(0, 0, 0, 1, 0, scratch, overhead)
    itemsize = max(max(DTYPE_SIZES[t.source.dtype], DTYPE_SIZES[t.out_dtype]) for t in tasks)
    work_factor = max((x.work_copies for t in tasks for x in t.terms), default=1)
    work_factor += _SURVIVAL_WORK + (_CODEC_WORK if any(t.quant is not None for t in tasks) else 0)
    on_cuda = merge_plan.device.startswith("cuda")
    shared = _shared_bytes(tasks, (budget - 2 * scratch) // 4)
    factors = 2 * max(fixed_cost(t) for t in tasks) + shared  # the cache is held like factors, whole run long
    # A tiny budget shrinks the chunk too (then a chunk is a whole tile).
    per_chunk_elem = SLABS * itemsize + FLOAT32_BYTES * work_factor
    chunk_elems = max(1, min(CHUNK_ELEMS, (budget - factors - 2 * scratch) // per_chunk_elem))
    for t in tasks:
        rows, unit = t.rows, t.row_unit
        chunk = max(unit, chunk_elems // t.row_elems)
        t.chunk_rows = rows if on_cuda else min(rows, chunk - chunk % unit)
    # On the CPU the float32 scratch is one chunk; on CUDA it lives on the device, outside max_memory.
    work_elems = 0 if on_cuda else max(t.chunk_rows * t.row_elems for t in tasks)
    work = FLOAT32_BYTES * work_elems * work_factor
    threads = _merge_threads(budget // _THREADS_SHARE // (work + _THREAD_SLACK), on_cuda)
    slack = _THREAD_SLACK * (threads - 1)
    fixed = factors + 2 * scratch + work * threads + slack
    # A slab's tiled scale rows round up to whole rows and aligned starts: at most one row and one alignment each.
    fixed += SLABS * max(
        (t.tiled_scale_row_bytes + SLAB_ALIGN * (len(t.tiled) + 1) for t in tasks if any(t.tiled)), default=0
    )
    # On the CPU, merged tensors of a local base are read in place: a mapped window per slab (from a page
    # boundary). Not at the smallest budgets: there the windows halve the tiles, and the allocator's slack
    # around many small tiles took the process 2% over a 128 MiB budget (5.8 GB model, 5 GB shard).
    mapped = not on_cuda and store_for(merge_plan.base.directory).maps_files and budget - fixed >= _MAPPED_ROOM
    if mapped:
        fixed += SLABS * mmap.ALLOCATIONGRANULARITY
    per_elem = SLABS * (itemsize + (max(DTYPE_SIZES[t.source.dtype] for t in tasks) if mapped else 0))
    elems = (budget - fixed) // per_elem
    for t in tasks:
        _fit_rows(t, elems, itemsize, lambda block: overhead + fixed + block * per_elem, merge_plan.plan.max_memory)
    tile_elems = max(t.rows_per_tile * t.row_elems for t in tasks)
    slab = max(t.tile_bytes(t.rows_per_tile) for t in tasks)
    window = max(t.rows_per_tile * t.row_bytes for t in tasks) + mmap.ALLOCATIONGRANULARITY if mapped else 0
    return Buffers(
        SLABS,
        slab,
        tile_elems if on_cuda else work_elems,
        work_factor,
        factors - shared,
        scratch,
        overhead + slack,
        shared,
        window,
        threads,
    )


def _merge_threads(room: int, on_cuda: bool) -> int:
    """How many threads merge a tile's chunks on the CPU, with room for `room` more beside the first."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if on_cuda else max(1, min(MERGE_THREADS, cores, room + 1))


def _fit_rows(t: TensorTask, elems: int, itemsize: int, need, max_memory: int) -> None:
    """Rows per tile for `t` with room for `elems` slab elements: whole row units (a scale grid's blocks), whole
    chunks when a tile holds several; a budget that cannot hold one row unit is refused with what it would take
    (`need(block bytes)`)."""
    rows, unit, row = t.rows, t.row_unit, _row_cost(t, itemsize)
    block = min(rows, unit) * row
    if block > elems:
        what = "one row block" if unit == 1 else f"one block of {unit} rows (its scale grid)"
        total = need(block)
        raise ShardmergeError(
            f"max_memory {format_size(max_memory)} is too small for tensor {t.name!r}: {what} needs "
            f"{format_size(total)} in all; raise max_memory to at least {format_size(int(total * 1.1) + MiB)}"
        )
    t.rows_per_tile = max(1, min(rows, elems // row))
    if t.rows_per_tile < rows:
        t.rows_per_tile = max(unit, t.rows_per_tile - t.rows_per_tile % unit)
    if t.rows_per_tile > t.chunk_rows:
        # Whole chunks per tile: the same chunks, so the same bytes, whatever the budget.
        t.rows_per_tile -= t.rows_per_tile % t.chunk_rows
    else:
        t.chunk_rows = t.rows_per_tile
    if t.column_norms and t.needs_amax:
        raise ShardmergeError(
            f"{t.name}: DoRA on a transposed layer into a per-tensor-scaled quantized weight "
            "needs two pre-passes, which shardmerge does not do; use dtype: bfloat16"
        )


def _overhead(merge_plan: MergePlan) -> int:
    """What a run of this plan holds before any buffer: RUNTIME_BYTES, the plan's objects beyond PLAN_TENSORS
    tensors, and the output store's part buffers. A max_memory that leaves nothing beyond it is refused."""
    tensors = sum(len(s.tasks) for s in merge_plan.shards)
    reserved = store_for(location(merge_plan.plan.output)).write_memory()
    overhead = RUNTIME_BYTES + PER_TENSOR_BYTES * max(0, tensors - PLAN_TENSORS) + reserved
    if merge_plan.plan.max_memory <= overhead:
        parts = f", {format_size(reserved)} of upload part buffers" if reserved else ""
        raise ShardmergeError(
            f"max_memory {format_size(merge_plan.plan.max_memory)} is too small: a run of this "
            f"model holds {format_size(overhead)} before any buffer (threads, the plan of {tensors} "
            f"tensors, allocator{parts}); set max_memory to at least {format_size(overhead + MiB)}"
        )
    return overhead


def _shared_bytes(tasks: list[TensorTask], room: int) -> int:
    """Room for the adapter tensors several tasks read (an expert parameter's lora_B, read again for each of its
    per-expert tensors): enough for every such tensor of one module (a layer's gate, up and down slices come
    interleaved in name order), within a quarter of the buffers' budget; 0 where none fits."""
    by_module: dict[str, dict] = {}
    for t in tasks:
        for term in t.terms:
            for info in term.shared_reads():
                by_module.setdefault(term.origin.rpartition(".")[0], {})[info] = FLOAT32_BYTES * info.numel
    need = max((sum(sizes.values()) for sizes in by_module.values()), default=0)
    return need if need <= room else 0


def scratch_bytes(budget: int) -> int:
    """The fixed buffer size for fallback copies and checksum reads, taken from what the budget leaves for buffers."""
    return min(IO_BUFFER, budget // 16)


def fixed_cost(task: TensorTask) -> int:
    """Bytes held for a whole task: every term's factors, and a quantized source's whole (untiled) scales as
    stored, twice when requantized (the fresh ones), plus float32 for decoding them. Tiled scales travel with
    their tiles (_row_cost)."""
    total = sum(t.fixed_bytes for t in task.terms)
    if task.quant is not None:
        scales = [s for s, tiled in zip(task.quant.scales, task.tiled) if not tiled]
        total += (2 if task.requant else 1) * sum(s.nbytes for s in scales) + 4 * sum(s.numel for s in scales)
    return total


def _row_cost(task: TensorTask, itemsize: int) -> int:
    """Slab elements one row of a tile takes: its own, and in the same units its share of the tiled scales'
    rows its slab carries (TensorTask.tile_layout)."""
    return task.row_elems + math.ceil(task.tiled_scale_row_bytes / (task.row_unit * itemsize))
