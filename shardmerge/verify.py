"""`shardmerge verify OUTPUT`: is this output what its manifest says, and (with the plan) is it right?"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import ShardmergeError
from .journal import MANIFEST_NAME, Manifest
from .libc import pin_mmap_threshold
from .safetensors_io import read_header
from .sources import INDEX_NAME
from .stores import location, store_for
from .units import MiB, format_size

_JSON_LIMIT = 64 * MiB
_CHECKSUM_BUFFER = MiB  # small: verify stays within budgets too


def verify(output: str, plan: str | None = None, samples: int = 8, max_memory: int | None = None) -> list[str]:
    """Every problem found, one line each; an empty list means the output checks out. With `plan`, samples are
    recomputed within `max_memory` (default: the plan's, as a merge would use)."""
    pin_mmap_threshold()
    out = location(output)
    store = store_for(out)
    if not store.is_dir(out):
        return [f"{out}: not a directory"]
    manifest = Manifest.read(store, out)
    if manifest is None:
        return [f"{out / MANIFEST_NAME}: missing or unreadable; the merge did not finish (re-run its plan)"]
    shards = manifest.shards
    problems, headers = [], {}
    for name, record in sorted(shards.items()):
        path = out / name
        stat = store.stat(path)
        if stat is None:
            problems.append(f"{path}: shard is missing")
            continue
        if stat.size != record.size:
            problems.append(f"{path}: size {stat.size} differs from the manifest's {record.size}")
        elif not record.matches(store.checksum(path, _CHECKSUM_BUFFER)):
            problems.append(f"{path}: checksum differs from the manifest (corrupted or modified)")
        try:
            headers[name] = read_header(path)
        except ShardmergeError as e:
            problems.append(str(e))
    for name, size in sorted((manifest.copied_files or {}).items()):
        path = out / name
        stat = store.stat(path)
        if stat is None:
            problems.append(f"{path}: copied from the base but missing")
        elif stat.size != size:
            problems.append(f"{path}: size {stat.size} differs from the manifest's {size}")
    stray = [p.name for p in store.list(out) if p.name.endswith(".safetensors") and p.name not in shards]
    problems += [f"{out / name}: shard not listed in the manifest" for name in stray]
    if manifest.index:
        problems += _check_index(out / INDEX_NAME, headers, manifest.total_size)
    if plan is not None and not problems:
        problems += _recompute(out, plan, samples, max_memory)
    return problems


def _json(path) -> dict:
    return json.loads(store_for(path).read_small(path, _JSON_LIMIT).decode("utf-8"))


def _check_index(path, headers: dict, total_size) -> list[str]:
    try:
        index = _json(path)
        weight_map = index["weight_map"]
        declared = index["metadata"]["total_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{path}: missing or not a valid index"]
    problems = []
    stored = {t: name for name, h in headers.items() for t in h.tensors}
    for tensor, shard in weight_map.items():
        if stored.get(tensor) != shard:
            where = f"is in {stored[tensor]}" if tensor in stored else "is in no shard"
            problems.append(f"{path}: maps {tensor!r} to {shard}, but it {where}")
    problems += [
        f"{path}: tensor {t!r} in {s} is missing from the index" for t, s in stored.items() if t not in weight_map
    ]
    actual = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    if declared != actual or (total_size is not None and declared != total_size):
        problems.append(f"{path}: total_size {declared} but the shards hold {actual} bytes of tensors")
    return problems


def _recompute(out, plan_path: str, samples: int, max_memory: int | None) -> list[str]:
    """Recompute a sample of merged tensors from the inputs in float64, block of rows by block of rows within
    max_memory, and compare with what was written."""
    import dataclasses

    from .config import load_plan
    from .planner import build_plan

    plan = load_plan(plan_path)
    if max_memory is not None:
        plan = dataclasses.replace(plan, max_memory=max_memory)
    with tempfile.TemporaryDirectory() as scratch:
        merge_plan = build_plan(plan, Path(scratch), "cpu")
        tasks = [(s, t) for s in merge_plan.shards for t in s.tasks if t.terms and t.out_nbytes]
        step = max(1, len(tasks) // max(samples, 1))
        problems = []
        for shard, task in tasks[::step][:samples]:
            header = read_header(out / shard.name)
            written = header.tensors.get(task.name)
            _, dtype, shape, _ = task.entries()[0]
            if written is None or (written.dtype, written.shape) != (dtype, tuple(shape)):
                problems.append(
                    f"{out / shard.name}: tensor {task.name!r} is missing or not the planned {dtype} {list(shape)}"
                )
                continue
            if task.requant:
                problems += _check_requantized(out / shard.name, task, header, _block_rows(task, plan.max_memory))
                continue
            error = _max_error(task, written, _block_rows(task, plan.max_memory))
            if error > 1:
                problems.append(
                    f"{out / shard.name}: tensor {task.name!r} differs from a recomputation from the "
                    f"inputs ({error:.3g} times what rounding allows)"
                )
        return problems


def _block_rows(task, budget: int) -> int:
    """Rows recomputed at once: float64 factors (twice their float32 size) and, per element, the float64 tile,
    its base copy and the terms' temporaries (a quantized base's codec's too), the written values in float64,
    and both raw inputs."""
    from .budget import RUNTIME_BYTES, fixed_cost
    from .safetensors_io import DTYPE_SIZES

    rows = task.rows
    row_elems = task.source.numel // rows if rows else 1
    copies = max(t.work_copies for t in task.terms) + 3 + (4 if task.quant is not None else 0)
    per_row = row_elems * (8 * copies + DTYPE_SIZES[task.source.dtype] + DTYPE_SIZES[task.out_dtype])
    per_row += 3 * -(-task.tiled_scale_row_bytes // task.row_unit)  # a block's scales: the base's, fresh, written
    room = budget - RUNTIME_BYTES - 2 * fixed_cost(task)
    if room < per_row * task.row_unit:
        need = budget - room + per_row * task.row_unit
        raise ShardmergeError(
            f"max_memory {format_size(budget)} is too small to recompute tensor {task.name!r} in "
            "float64; "
            f"give verify --max-memory at least {format_size(need)}"
        )
    block = max(1, min(rows, room // per_row))
    unit = task.row_unit  # a quantized tensor's scale blocks stay whole
    return block if block == rows else max(unit, block - block % unit)


def _expected_blocks(task, block: int):
    """(r0, r1, the float64 merge of rows r0:r1) for every block of rows; a quantized base is dequantized by
    its codec first."""
    from . import terms

    rows = task.rows
    factors = terms.load_factors(
        task.terms, lambda info: _rows64(info, 0, info.shape[0] if info.shape else 1).reshape(info.shape)
    )
    side = _whole_scales(task, task.quant.scales) if task.quant is not None else []
    blocks = [(r0, min(r0 + block, rows)) for r0 in range(0, rows, block)]
    if any(t.column_norms for t in task.terms):  # column norms need every row before any row merges
        for r0, r1 in blocks:
            terms.column_pass(task.terms, factors, _base_rows(task, side, r0, r1), r0, r1, rows)
    for r0, r1 in blocks:
        yield r0, r1, terms.merge_tile(task.terms, factors, _base_rows(task, side, r0, r1), r0, r1)


def _max_error(task, written, block: int) -> float:
    """The largest error of the written tensor against its float64 recomputation, block by block, as a multiple
    of what rounding allows: twice the output dtype's epsilon of the value (rounding once), plus the float32
    arithmetic of the merge, which errs relative to the operands (W and the delta), not to their sum: where
    they cancel the sum is small and its error is not (16 float32 epsilons of the block's RMS, which stands for
    the operands' magnitude: a LoRA delta is small beside W, so W + delta has W's RMS)."""
    import torch

    from .mergemath import TORCH_DTYPES

    out, f32 = torch.finfo(TORCH_DTYPES[task.out_dtype]), torch.finfo(torch.float32)
    worst = 0.0
    for r0, r1, expected in _expected_blocks(task, block):
        error = _rows64(written, r0, r1, task.rows).sub_(expected).abs_()
        magnitude = expected.abs_()  # in place: verify's budget holds three float64 tiles here
        rms = (magnitude.norm() / magnitude.numel() ** 0.5).item()
        allowed = magnitude.mul_(2 * out.eps + 16 * f32.eps).add_(16 * f32.eps * rms + out.tiny)
        worst = max(worst, error.div_(allowed).max().item())
    return worst


def _check_requantized(path: Path, task, header, block: int) -> list[str]:
    """A requantized tensor may be no further (in norm) from the float64 merge than requantizing that merge is
    (1.5x: float32 arithmetic can move a value across a rounding boundary)."""
    q = task.quant
    out_scales = [header.tensors[c.source.name] for c in task.companions]
    fresh, written = _whole_scales(task, q.scales), _whole_scales(task, out_scales)
    amax = max(float(e.abs().max()) for _, _, e in _expected_blocks(task, block)) if task.needs_amax else None
    group = task.quant_group
    error = ideal = 0.0
    for r0, r1, expected in _expected_blocks(task, block):
        scratch = _block_scales(task, q.scales, fresh, r0, r1)
        requantized = q.codec.encode(q, expected.float(), scratch, 0, amax, group)
        ideal += (q.codec.decode(q, requantized, scratch, 0, group).double() - expected).square().sum().item()
        stored = _block_scales(task, out_scales, written, r0, r1)
        actual = q.codec.decode(q, _rows(header.tensors[task.name], r0, r1, task.rows), stored, 0, group).double()
        error += (actual - expected).square().sum().item()
    if error**0.5 > 1.5 * ideal**0.5 + 1e-9:
        line = (
            f"{path}: tensor {task.name!r} ({q.codec.label}) is further from a recomputation from the inputs "
            f"than requantizing it is (error {error**0.5:.3g}, requantized {ideal**0.5:.3g})"
        )
        return [line]
    return []


def _base_rows(task, side: list, r0: int, r1: int):
    """Rows r0:r1 of the unmerged tensor in float64."""
    import torch

    q = task.quant
    if q is None:
        return _rows64(task.source, r0, r1, task.rows)
    side = _block_scales(task, q.scales, side, r0, r1)
    return q.codec.decode(q, _rows(q.codes, r0, r1, task.rows), side, 0, task.quant_group).to(torch.float64)


def _whole_scales(task, infos) -> list:
    """The scales held whole (one value per tensor), read; None for a tiled one (read block by block)."""
    return [None if tiled else _whole(info) for info, tiled in zip(infos, task.tiled)]


def _block_scales(task, infos, whole: list, r0: int, r1: int) -> list:
    """The scales rows r0:r1 decode with, from `infos` (the base's or the output's): the rows of a tiled one
    that cover them (so the codec counts rows from r0), a whole one as `whole` holds it."""
    b0, b1 = task.scale_rows(r0, r1)
    return [_whole(info.rows(b0, b1)) if tiled else w for info, tiled, w in zip(infos, task.tiled, whole)]


def _whole(info):
    """A (small) tensor as stored, whole."""
    rows = info.shape[0] if info.shape else 1
    return _rows(info, 0, rows).reshape(info.shape)


def _rows64(info, r0: int, r1: int, rows: int | None = None):
    """Rows r0:r1 of a tensor read straight from its file, as a 2-D float64 tile; `rows` is how many rows the
    tensor is cut into (the task's: dim 0, or (expert, d1) for a stack of experts), default dim 0."""
    import torch

    return _rows(info, r0, r1, rows).to(torch.float64)


def _rows(info, r0: int, r1: int, rows: int | None = None):
    """Rows r0:r1 of a tensor read straight from its file, as stored, 2-D (`rows` as for _rows64)."""
    import torch

    from .mergemath import TORCH_DTYPES

    row_bytes = info.row_bytes if rows is None else info.nbytes // max(rows, 1)
    raw = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
    with store_for(info.path).open(info.path) as reader:
        reader.read_into(raw.numpy(), info.offset + r0 * row_bytes)
    return raw.view(TORCH_DTYPES[info.dtype]).reshape(r1 - r0, -1)
