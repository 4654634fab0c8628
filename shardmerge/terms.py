"""What one adapter does to one base tensor: a term. Each kind is one frozen dataclass that carries all of
its behaviour, so the planner, the executor and verify never ask which kind they hold.

A term knows
  - `reads()`: the adapter tensors (TensorInfo) it needs, read whole: they are small next to the base;
  - `factors(load)`: those tensors made ready for the math, where `load(TensorInfo) -> torch.Tensor` gives
    a tensor in the merge precision on the merge device (float32 on the executor's device, float64 on
    the CPU for verify's recomputation);
  - `apply(factors, work, base, r0, r1)`: its effect on `work`, a 2-D float32 tile holding rows r0:r1 of
    the tensor (rows by everything else flattened) with the terms before it already applied; `base` is
    the tile before any term, kept only when some term has `needs_base`. It returns the tile (in place
    where it can);
  - `column_norms` and `column_pass(...)`: whether it needs a pass over every row before the merge
    (DoRA on a transposed kind normalises columns, which no row block sees alone), and that pass;
  - `fixed_bytes`: the memory its factors hold for the whole tensor, for the planner's budget, and
    `work_copies`: how many tile-sized float32 buffers its `apply` may hold at once;
  - `describe(task)`: its line in the --dry-run report.
The arithmetic itself is in mergemath (pure functions on float32 tensors); a term only picks which.

Adding a kind (an expert slice of a fused MoE parameter, say) is one new subclass of Term here that
implements the methods above, plus the code in matching.py that matches its adapter tensors to a base tensor
and appends it to that TensorTask's `terms`; nothing in the executor or verify changes. A term may
point its TensorInfo at part of a file (an expert's slice is a row range of a fused tensor: offset and
shape narrowed), since `load` reads exactly `nbytes` at `offset`.

A quantized codec is not a term: it changes how the base tile itself is decoded before the terms run
and encoded after, and lives with the formats, not here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import experts as experts_mod
from . import mergemath
from .safetensors_io import TensorInfo
from .units import FLOAT32_BYTES

Load = Callable[[TensorInfo], torch.Tensor]


class Term(ABC):
    """One adapter's contribution to one base tensor. Subclasses are frozen dataclasses with an `origin`
    ("adapter path: module") for messages."""

    origin: str
    column_norms: bool = False  # needs `column_pass` over every row before `apply`
    needs_base: bool = False  # `apply` reads the tile as it was before any term
    work_copies: int = 1  # tile-sized float32 buffers `apply` may hold at once (the tile itself included)
    row_dims: int = 1  # leading dims a tile's rows run over (2 for a stack of experts: rows are (expert, d1))
    every_row: bool = True  # changes every row, so that a sample of rows shows how much of its change survived

    @abstractmethod
    def reads(self) -> tuple[TensorInfo, ...]:
        """The adapter tensors this term reads whole."""

    def shared_reads(self) -> tuple[TensorInfo, ...]:
        """Of `reads()`, the tensors other tasks' terms read too; the executor keeps them loaded (within the
        plan's Buffers.shared_bytes) instead of reading them again for each task."""
        return ()

    @property
    def fixed_bytes(self) -> int:
        """Bytes its factors hold while its tensor merges."""
        return sum(FLOAT32_BYTES * t.numel for t in self.reads())

    @abstractmethod
    def factors(self, load: Load):
        """Its tensors, loaded with `load` and shaped for `apply`."""

    @abstractmethod
    def apply(self, factors, work: torch.Tensor, base: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
        """`work` (rows r0:r1, float32) with this term applied."""

    def column_pass(self, factors, base: torch.Tensor, r0: int, r1: int, rows: int) -> None:
        """Add rows r0:r1 of the unmerged tensor (`rows` rows in all) to the pre-pass; only if column_norms."""
        raise NotImplementedError(f"{type(self).__name__} needs no column pre-pass")

    @abstractmethod
    def describe(self, task) -> str:
        """Its line in the --dry-run report, for the TensorTask it belongs to."""


@dataclass(frozen=True)
class LoraTerm(Term):
    """W += weight * scaling * B @ A (transposed kinds: (B @ A)^T); with `magnitude`, PEFT's DoRA."""

    a: TensorInfo
    b: TensorInfo
    scaling: float  # PEFT's: alpha/r or alpha/sqrt(r)
    weight: float  # the plan's multiplier on this adapter
    transposed: bool  # delta = (B @ A)^T: embeddings and Conv1D (fan_in_fan_out)
    magnitude: TensorInfo | None  # DoRA
    origin: str
    singular: TensorInfo | None = None  # AdaLoRA's lora_E (r, 1): the delta is B @ (A * E)

    @property
    def scale(self) -> float:
        return self.weight * self.scaling

    @property
    def column_norms(self) -> bool:
        return self.magnitude is not None and self.transposed

    @property
    def needs_base(self) -> bool:
        return self.magnitude is not None

    @property
    def work_copies(self) -> int:
        # DoRA's apply holds the unmerged base, the scaled delta, W + delta and the merged tile besides work.
        return 5 if self.magnitude is not None else 1

    def reads(self) -> tuple[TensorInfo, ...]:
        extras = tuple(t for t in (self.magnitude, self.singular) if t is not None)
        return (self.a, self.b) + extras

    @property
    def fixed_bytes(self) -> int:
        # The magnitude twice: DoRA on a transposed kind also keeps one column norm per magnitude entry.
        extras = 2 * (self.magnitude.numel if self.magnitude else 0) + (self.singular.numel if self.singular else 0)
        return FLOAT32_BYTES * (self.a.numel + self.b.numel + extras)

    def factors(self, load: Load) -> mergemath.LoraFactors:
        magnitude = None if self.magnitude is None else load(self.magnitude).flatten()
        a = load(self.a)
        if self.singular is not None:
            a = a * load(self.singular).reshape(-1, *([1] * (a.dim() - 1)))
        return mergemath.lora_factors(
            a,
            load(self.b),
            scaling=self.scaling,
            weight=self.weight,
            transposed=self.transposed,
            magnitude=magnitude,
        )

    def apply(self, factors, work, base, r0, r1):
        if self.magnitude is None:
            mergemath.add_lora(work, factors, r0, r1)
            return work
        return mergemath.apply_dora(work, base, factors, r0, r1)

    def column_pass(self, factors, base, r0, r1, rows):
        mergemath.accumulate_column_norm(base, factors, r0, r1, rows)

    def describe(self, task) -> str:
        a = "(A*E)" if self.singular is not None else "A"
        kind = ("DoRA " if self.magnitude is not None else "") + (f"(B@{a})^T" if self.transposed else f"B@{a}")
        src = task.source
        return (
            f"  merge {task.name} {list(src.shape)} {src.dtype}->{task.out_dtype}: {self.origin} "
            f"r={self.a.shape[0]} scale={self.scale:.6g} {kind}, tiles of {task.rows_per_tile} rows"
        )


@dataclass(frozen=True)
class BiasTerm(Term):
    """lora_bias: the target bias gains scale * lora_B.bias."""

    vector: TensorInfo
    scale: float
    origin: str

    def reads(self) -> tuple[TensorInfo, ...]:
        return (self.vector,)

    def factors(self, load: Load) -> torch.Tensor:
        return load(self.vector).flatten()

    def apply(self, factors, work, base, r0, r1):
        mergemath.add_bias(work, factors, self.scale, r0, r1)
        return work

    def describe(self, task) -> str:
        return f"  bias  {task.name}: {self.origin} scale={self.scale:.6g}"


@dataclass(frozen=True)
class RowsTerm(Term):
    """Trainable tokens: the listed embedding rows become the adapter's values (weight interpolates)."""

    indices: tuple[int, ...]
    values: TensorInfo
    weight: float
    origin: str
    every_row = False

    def reads(self) -> tuple[TensorInfo, ...]:
        return (self.values,)

    @property
    def fixed_bytes(self) -> int:
        return FLOAT32_BYTES * self.values.numel + 8 * len(self.indices)  # int64 indices

    def factors(self, load: Load) -> tuple[torch.Tensor, torch.Tensor]:
        values = load(self.values)
        return torch.tensor(self.indices, dtype=torch.int64, device=values.device), values

    def apply(self, factors, work, base, r0, r1):
        indices, values = factors
        mergemath.replace_rows(work, indices, values, self.weight, r0, r1)
        return work

    def describe(self, task) -> str:
        return f"  rows  {task.name}: {self.origin} {len(self.indices)} trainable tokens"


@dataclass(frozen=True)
class ExpertTerm(Term):
    """LoRA on an expert parameter (PEFT's ParamWrapper): the base tensor holds `part` of ΔP (E, d1, d2), and
    gains weight * scaling * ΔP[e] there for each of its experts. Works on float32 rows whatever the storage
    dtype, so a codec can wrap it like any other term."""

    a: TensorInfo  # lora_A's rows for this tensor's experts (experts.narrowed_reads)
    b: TensorInfo  # lora_B (b, r*E), packed as `layout` says; when swapped only this tensor's rows
    experts: int
    swap: bool  # PEFT's orientation: ΔP[e] = B_e @ A_e (else A_e^T @ B_e^T)
    layout: str  # experts.RANK_MAJOR (PEFT) or experts.GROUPED_BY_EXPERT (Unsloth)
    part: experts_mod.ExpertSlice
    scaling: float
    weight: float
    origin: str  # "adapter path: <module>.<param>"
    stored_as: str  # how the base stores the whole parameter, for the dry run (one line per parameter)

    @property
    def scale(self) -> float:
        return self.weight * self.scaling

    @property
    def row_dims(self) -> int:
        return 2 if self.part.count > 1 else 1

    def reads(self) -> tuple[TensorInfo, ...]:
        return self.a, self.b

    def shared_reads(self) -> tuple[TensorInfo, ...]:
        # B_e's columns are strided, so every per-expert tensor of the parameter reads the same lora_B rows
        return (self.b,) if self.part.count < self.experts else ()

    def factors(self, load: Load) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = experts_mod.expert_factors(
            load(self.a), load(self.b), self.experts, self.layout, self.swap, self.part
        )
        return left.contiguous(), right.contiguous()

    @property
    def fixed_bytes(self) -> int:
        # the packed factors while the slice is cut from them, then the slice itself
        return FLOAT32_BYTES * (self.a.numel + self.b.numel) * 2

    def apply(self, factors, work, base, r0, r1):
        left, right = factors
        mergemath.add_experts(work, left, right, self.scale, self.part.transposed, r0, r1)
        return work

    def describe(self, task) -> str:
        # The same line for every base tensor of the parameter: the dry run prints it once.
        orientation = "B_e@A_e" if self.swap else "A_e^T@B_e^T"
        return (
            f"  experts {self.origin}: E={self.experts} r={self.b.shape[1] // self.experts} "
            f"scale={self.scale:.6g} {orientation} lora_B {self.layout} -> {self.stored_as}"
        )


def load_factors(terms: list[Term], load: Load) -> list:
    """Every term's factors, in term order."""
    return [term.factors(load) for term in terms]


def column_pass(terms: list[Term], factors: list, base: torch.Tensor, r0: int, r1: int, rows: int) -> None:
    """The pre-pass over rows r0:r1 (of `rows`) for the terms that need one; `base` is not modified."""
    for term, f in zip(terms, factors):
        if term.column_norms:
            term.column_pass(f, base, r0, r1, rows)


def merge_tile(terms: list[Term], factors: list, work: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Apply every term, in plan order, to a float32 tile holding rows r0:r1 of the (replaced) base."""
    base = work.clone() if any(t.needs_base for t in terms) else None
    for term, f in zip(terms, factors):
        work = term.apply(f, work, base, r0, r1)
    return work
