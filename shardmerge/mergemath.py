"""The merge arithmetic, as pure functions on float32 tiles (a block of rows of one tensor).

A tile is 2-D: rows of the stored tensor by everything else flattened (a bias is (rows, 1)). Rows of a
delta are exact and cheap to compute alone: rows of B @ A are B[rows] @ A, and for the transposed kinds
(embeddings, Conv1D) rows of (B @ A)^T are A[:, rows]^T @ B^T. Everything is float32 and rounded once,
by the caller, to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip


@dataclass
class LoraFactors:
    """One LoRA term, ready on the merge device: A as (r, in), B as (out, r), both float32."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    weight: float
    transposed: bool
    magnitude: torch.Tensor | None = None  # DoRA, flattened
    column_norm: torch.Tensor | None = None  # DoRA on a transposed kind, from the pre-pass


def lora_factors(a: torch.Tensor, b: torch.Tensor, **kwargs) -> LoraFactors:
    """Factors from PEFT's stored shapes: conv A (r, in, *k) and B (out, r, 1...) reduce to 2-D.
    The caller picks the precision (float32 to merge, float64 to check)."""
    r = a.shape[0]
    return LoraFactors(a.reshape(r, -1), b.reshape(b.shape[0], r), **kwargs)


def delta_rows(f: LoraFactors, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the unscaled delta, in the stored tensor's orientation."""
    if f.transposed:
        return f.a[:, r0:r1].t() @ f.b.t()
    return f.b[r0:r1] @ f.a


def add_lora(work: torch.Tensor, f: LoraFactors, r0: int, r1: int) -> None:
    """work += weight * scaling * delta[r0:r1], in place, without a delta-sized temporary."""
    scale = f.weight * f.scaling
    if f.transposed:
        work.addmm_(f.a[:, r0:r1].t(), f.b.t(), alpha=scale)
    else:
        work.addmm_(f.b[r0:r1], f.a, alpha=scale)


def dora_column_sq(base: torch.Tensor, f: LoraFactors, r0: int, r1: int) -> torch.Tensor:
    """Per-column sum of squares of rows r0:r1 of (W0 + s * delta): one tile's share of a column norm."""
    return (base + f.scaling * delta_rows(f, r0, r1)).square().sum(dim=0)


def accumulate_column_norm(base: torch.Tensor, f: LoraFactors, r0: int, r1: int, rows: int) -> None:
    """The DoRA pre-pass for transposed kinds: add rows r0:r1's share to the column norm, and take the
    square root once the last of the tensor's `rows` rows is in."""
    part = dora_column_sq(base, f, r0, r1)
    f.column_norm = part if f.column_norm is None else f.column_norm.add_(part)
    if r1 == rows:
        f.column_norm.sqrt_()


def apply_dora(work: torch.Tensor, base: torch.Tensor, f: LoraFactors, r0: int, r1: int) -> torch.Tensor:
    """PEFT's DoRA merge, W' = m / ||W0 + s*delta|| * (W + s*delta), with the norm taken on the unmerged
    base W0 (per output row, or per column for transposed kinds); the plan weight interpolates,
    W + weight * (W' - W), so weight 1 is exactly PEFT and weight 0 leaves W unchanged."""
    delta = f.scaling * delta_rows(f, r0, r1)
    if f.transposed:
        factor = (f.magnitude / f.column_norm).unsqueeze(0)
    else:
        factor = (f.magnitude[r0:r1] / torch.linalg.vector_norm(base + delta, dim=1)).unsqueeze(1)
    merged = factor * (work + delta)
    if f.weight == 1.0:
        return merged
    return work.add_(merged.sub_(work), alpha=f.weight)


def add_bias(work: torch.Tensor, vector: torch.Tensor, scale: float, r0: int, r1: int) -> None:
    """work += scale * vector[r0:r1], in place; a bias tile is (rows, 1)."""
    work.add_(vector[r0:r1].reshape(work.shape), alpha=scale)


def replace_rows(
    work: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, weight: float, r0: int, r1: int
) -> None:
    """Trainable tokens: rows `indices` (int64, of the whole tensor) become `values`, or with weight w move
    that fraction of the way, W + w * (values - W); only the ones inside rows r0:r1 touch this tile."""
    inside = (indices >= r0) & (indices < r1)
    rows, values = indices[inside] - r0, values[inside]
    work[rows] = values if weight == 1.0 else work[rows] + weight * (values - work[rows])


def add_experts(
    work: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float, transposed: bool, r0: int, r1: int
) -> None:
    """work += scale * rows r0:r1 of a stack of expert deltas ΔP[e] = left[e] @ right[e], in place.

    left (n, d1, r) and right (n, r, d2) hold n consecutive experts. Stored plainly the tensor's rows run
    over (expert, d1) and each is d2 long; transposed they run over (expert, d2), each d1 long. A tile may
    start or end inside an expert, and each expert's share is one addmm with no delta-sized temporary."""
    per_expert = right.shape[2] if transposed else left.shape[1]
    for e in range(r0 // per_expert, (r1 - 1) // per_expert + 1):
        lo, hi = max(r0, e * per_expert) - e * per_expert, min(r1, (e + 1) * per_expert) - e * per_expert
        dst = work[e * per_expert + lo - r0 : e * per_expert + hi - r0]
        if transposed:
            dst.addmm_(right[e][:, lo:hi].t(), left[e].t(), alpha=scale)
        else:
            dst.addmm_(left[e][lo:hi], right[e], alpha=scale)


# Delta survival is a diagnostic, and its exact sums cost as much as the merge itself (a float32 copy of the
# base, the rounded result widened back, two differences, two norms). A tensor larger than SURVIVAL_EXACT_ELEMS
# has them taken on a fixed sample of its rows instead: runs of about SURVIVAL_RUN_ELEMS elements, one run in
# every SURVIVAL_STRIDE, placed by row number so that the sample (and the number reported) does not depend on
# the tiling, the budget or the device. Contiguous runs keep the sums to a few large operations per chunk
# rather than many small strided ones. A term that changes only some rows (trainable tokens) is summed whole.
SURVIVAL_EXACT_ELEMS = 1024 * 1024
SURVIVAL_RUN_ELEMS = 64 * 1024
SURVIVAL_STRIDE = 64


def survival_sample(numel: int, row_elems: int, every_row: bool) -> tuple[int, int]:
    """(run, period): delta survival is summed over the rows r with r % period < run (all of a small tensor,
    or of one whose terms do not all change every row)."""
    if numel <= SURVIVAL_EXACT_ELEMS or not every_row:
        return 1, 1
    run = max(1, SURVIVAL_RUN_ELEMS // row_elems)
    return run, run * SURVIVAL_STRIDE


def sampled_ranges(r0: int, r1: int, run: int, period: int) -> list[tuple[int, int]]:
    """The row ranges within r0:r1 of the rows r with r % period < run."""
    ranges = []
    for k in range(r0 // period, (r1 - 1) // period + 1) if r1 > r0 else ():
        start, stop = max(r0, k * period), min(r1, k * period + run)
        if start < stop:
            ranges.append((start, stop))
    return ranges
