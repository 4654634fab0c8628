"""`shardmerge verify OUTPUT`: is this output what its manifest says, and (with the plan) is it right?"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import ShardmergeError
from .journal import MANIFEST_NAME, file_checksum
from .safetensors_io import read_header
from .sources import INDEX_NAME


def verify(output: str, plan: str | None = None, samples: int = 8) -> list[str]:
    """Every problem found, one line each; an empty list means the output checks out."""
    out = Path(output)
    if not out.is_dir():
        return [f"{out}: not a directory"]
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{out / MANIFEST_NAME}: missing or unreadable; the merge did not finish (re-run its plan)"]
    problems, headers = [], {}
    for name, entry in sorted(shards.items()):
        path = out / name
        if not path.is_file():
            problems.append(f"{path}: shard is missing")
            continue
        if path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size} differs from the manifest's {entry['size']}")
        elif file_checksum(path) != entry["xxh3_128"]:
            problems.append(f"{path}: checksum differs from the manifest (corrupted or modified)")
        try:
            headers[name] = read_header(path)
        except ShardmergeError as e:
            problems.append(str(e))
    for name, size in sorted((manifest.get("copied_files") or {}).items()):
        path = out / name
        if not path.is_file():
            problems.append(f"{path}: copied from the base but missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: size {path.stat().st_size} differs from the manifest's {size}")
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in shards)
    problems += [f"{out / name}: shard not listed in the manifest" for name in stray]
    if manifest.get("index"):
        problems += _check_index(out / INDEX_NAME, headers, manifest.get("total_size"))
    if plan is not None and not problems:
        problems += _recompute(out, plan, samples)
    return problems


def _check_index(path: Path, headers: dict, total_size) -> list[str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
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
    problems += [f"{path}: tensor {t!r} in {s} is missing from the index" for t, s in stored.items() if t not in weight_map]
    actual = sum(t.nbytes for h in headers.values() for t in h.tensors.values())
    if declared != actual or (total_size is not None and declared != total_size):
        problems.append(f"{path}: total_size {declared} but the shards hold {actual} bytes of tensors")
    return problems


def _recompute(out: Path, plan_path: str, samples: int) -> list[str]:
    """Recompute a sample of merged tensors from the inputs in float64 and compare with what was written."""
    import torch
    from safetensors import safe_open

    from . import mergemath
    from .config import load_plan
    from .planner import build_plan

    plan = load_plan(plan_path)
    with tempfile.TemporaryDirectory() as scratch:
        merge_plan = build_plan(plan, Path(scratch), "cpu")
        tasks = [(s, t) for s in merge_plan.shards for t in s.tasks if t.terms]
        step = max(1, len(tasks) // max(samples, 1))
        problems = []
        for shard, task in tasks[::step][:samples]:
            expected = _reference(task)
            with safe_open(str(out / shard.name), "pt") as f:
                actual = f.get_tensor(task.name).to(torch.float64)
            tolerance = 2 * torch.finfo(mergemath.TORCH_DTYPES[task.out_dtype]).eps
            error = ((actual - expected).abs() / expected.abs().clamp_min(1e-3)).max().item()
            if error > tolerance:
                problems.append(f"{out / shard.name}: tensor {task.name!r} differs from a recomputation from the "
                                f"inputs (relative error {error:.3g})")
        return problems


def _reference(task):
    """The merged tensor recomputed whole, in float64, straight from the input files."""
    import torch

    from . import mergemath, terms

    def load(info):
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            raw = bytearray(f.read(info.nbytes))
        return torch.frombuffer(raw, dtype=mergemath.TORCH_DTYPES[info.dtype]).reshape(info.shape).to(torch.float64)

    rows = task.source.shape[0]
    work = load(task.source).reshape(rows, -1)
    factors = terms.load_factors(task.terms, load)
    terms.column_pass(task.terms, factors, work, 0, rows, rows)
    return terms.merge_tile(task.terms, factors, work, 0, rows).reshape(task.source.shape)
