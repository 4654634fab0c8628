"""The plan's objects: what planner.build_plan decides and the executor, journal and verify read. Plain
dataclasses; a TensorTask's properties derive its row geometry (rows, row bytes, scale rows per tile) from its
source and terms, so every reader of the plan cuts tiles the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import mergemath
from .adapters import Adapter
from .config import Plan
from .formats import Quantized
from .safetensors_io import DTYPE_SIZES, TensorInfo
from .sources import BaseModel
from .terms import Term
from .units import FLOAT32_BYTES

SLAB_ALIGN = 16  # a tile's scale rows start on this within its slab, so they view as their dtype


def aligned(offset: int) -> int:
    return -(-offset // SLAB_ALIGN) * SLAB_ALIGN


@dataclass
class Companion:
    """A scale tensor a requantized weight rewrites: written with the weight's last tile."""

    source: TensorInfo
    out_offset: int = 0


@dataclass
class TensorTask:
    name: str
    source: TensorInfo  # the base tensor, or the adapter tensor replacing it (quantized: the logical tensor)
    out_dtype: str
    out_offset: int = 0  # absolute, in the output shard
    terms: list[Term] = field(default_factory=list)  # applied in order
    rows_per_tile: int = 0
    chunk_rows: int = 0
    quant: Quantized | None = None  # the source is quantized: tiles are dequantized as they are read
    requant: bool = False  # written back in the source's format, with `companions` (its fresh scales)
    companions: list[Companion] = field(default_factory=list)
    tiled: tuple[bool, ...] = ()  # per quant scale: its rows follow the row blocks, so it is read and written per tile

    @property
    def out_nbytes(self) -> int:
        if self.requant:
            return self.quant.codes.nbytes
        return self.source.numel * DTYPE_SIZES[self.out_dtype]

    @property
    def total_nbytes(self) -> int:
        return self.out_nbytes + sum(c.source.nbytes for c in self.companions)

    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """Its tensors in the output header: (name, dtype, shape, nbytes)."""
        shape = self.quant.codes.shape if self.requant else self.source.shape
        return [(self.name, self.out_dtype, shape, self.out_nbytes)] + [
            (c.source.name, c.source.dtype, c.source.shape, c.source.nbytes) for c in self.companions
        ]

    @property
    def is_copy(self) -> bool:
        return not self.terms and self.quant is None and self.source.dtype == self.out_dtype

    @property
    def column_norms(self) -> bool:
        """Whether some term needs a pass over all rows before the merge (DoRA on a transposed kind)."""
        return any(t.column_norms for t in self.terms)

    @property
    def rows(self) -> int:
        """Rows a tile is cut from: along dim 0, or along (expert, d1) for a stack of experts."""
        shape = self.source.shape
        return math.prod(shape[: max((t.row_dims for t in self.terms), default=1)]) if shape else 1

    @property
    def row_elems(self) -> int:
        """Elements of one row (a tensor without rows is one row)."""
        return self.source.numel // self.rows if self.rows else max(self.source.numel, 1)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as read; `out_row_bytes` as written."""
        return self.source.nbytes // self.rows if self.rows else self.source.nbytes

    @property
    def out_row_bytes(self) -> int:
        return self.out_nbytes // self.rows if self.rows else self.out_nbytes

    @property
    def survival_rows(self) -> tuple[int, int]:
        """(run, period): delta survival is summed over the rows r with r % period < run (all of a small tensor)."""
        return mergemath.survival_sample(self.source.numel, self.row_elems, all(t.every_row for t in self.terms))

    @property
    def needs_amax(self) -> bool:
        """Requantizing with one scale for the tensor needs the merged tensor's maximum first."""
        return self.requant and self.quant.codec.needs_amax(self.quant)

    @property
    def prepass(self) -> bool:
        return self.column_norms or self.needs_amax

    @property
    def quant_group(self) -> int:
        """Tile rows per row of a quantized source's codec: a codec counts rows along dim 0 of the logical
        tensor, and a stack of experts merged along (expert, d1) has d1 tile rows per expert."""
        return self.rows // self.source.shape[0] if self.quant is not None and self.source.shape else 1

    @property
    def row_unit(self) -> int:
        """Tiles and chunks start on multiples of this many rows: whole scale blocks (for MXFP4, whose scales
        run along the stored transpose, whole experts)."""
        return self.quant.codec.row_block(self.quant) * self.quant_group if self.quant is not None else 1

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The rows of every tiled scale that tile rows r0:r1 (r0 on a row unit) decode with: one per row unit."""
        return r0 // self.row_unit, -(-r1 // self.row_unit)

    @property
    def tiled_scale_row_bytes(self) -> int:
        """Bytes of one row of every tiled scale together (a row per row unit of the task)."""
        return sum(s.row_bytes for s, tiled in zip(self.quant.scales, self.tiled) if tiled) if self.quant else 0

    def tile_layout(self, r0: int, r1: int) -> list[tuple[int, TensorInfo, int]]:
        """Where a tile's rows of the tiled scales sit in its slab, after its data (as read or as written, the
        longer), each aligned for its dtype: (index in quant.scales, those rows, slab offset). The merge
        requantizes them in place, and the writer writes them back from there."""
        b0, b1 = self.scale_rows(r0, r1)
        offset = aligned((r1 - r0) * max(self.row_bytes, self.out_row_bytes))
        layout = []
        for i, (scale, tiled) in enumerate(zip(self.quant.scales if self.quant else (), self.tiled)):
            if tiled:
                layout.append((i, scale.rows(b0, b1), offset))
                offset = aligned(offset + (b1 - b0) * scale.row_bytes)
        return layout

    def tile_bytes(self, rows: int) -> int:
        """Slab bytes a tile of `rows` rows (from a row unit) takes: its data and its tiled scales' rows."""
        layout = self.tile_layout(0, rows)
        if not layout:
            return rows * max(self.row_bytes, self.out_row_bytes)
        return layout[-1][2] + layout[-1][1].nbytes


@dataclass
class OutputShard:
    name: str
    tasks: list[TensorTask]
    header: bytes = b""
    size: int = 0


@dataclass
class MergePlan:
    plan: Plan
    base: BaseModel
    adapters: list[Adapter]
    shards: list[OutputShard]
    write_index: bool
    device: str
    fingerprint: str = ""
    buffers: Buffers | None = None
    config: dict | None = None  # config.json to write instead of the base's (PEFT untied the embeddings)
    inputs: dict[str, dict] = field(default_factory=dict)  # output shard -> {input file: identity} it is made from
    quant_label: str = ""  # the base's quantized format, if any
    dropped_files: set[str] = field(default_factory=set)  # base files that would describe what is no longer so

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.total_nbytes for s in self.shards for t in s.tasks)

    def index(self) -> dict:
        weight_map = {e[0]: s.name for s in self.shards for t in s.tasks for e in t.entries()}
        metadata = {k: v for k, v in self.base.index_metadata.items() if k != "total_size"}
        return {"metadata": {**metadata, "total_size": self.total_tensor_bytes}, "weight_map": weight_map}


@dataclass(frozen=True)
class Buffers:
    """Every host buffer the executor may hold, fixed before it starts, so that max_memory is a bound.

    `slabs` tile buffers of `slab_bytes` circulate reader -> merger -> writer (a tile's output is written
    back into its own slab, over its input unless that was read in place through a mapped window of
    `mapped_bytes`); each of the `merge_threads` merging a tile's chunks owns a float32 scratch of `work_elems`
    (one chunk on the CPU, a whole tile on the GPU; times `work_factor` for the temporaries of DoRA, delta
    survival and codecs); two tasks'
    factors may be alive at once; and two `scratch` shares cover the fallback copy buffer (made only if the
    kernel copy fails) and the checksum's mmap window. `total` counts all of that and the run's fixed
    overhead, so it bounds the process's peak RSS above an idle `import torch, shardmerge`."""

    slabs: int
    slab_bytes: int
    work_elems: int
    work_factor: int
    factor_bytes: int
    scratch: int

    overhead: (
        int  # the run's fixed cost outside these buffers (RUNTIME_BYTES, the plan's objects, merge threads' slack)
    )
    shared_bytes: int = 0  # adapter tensors kept loaded across tasks (Term.shared_reads: an expert parameter's lora_B)
    # Merged tensors are read in place through a mapped window of at most this many bytes per tile in flight
    # (stores.local.Mapped), instead of into the tile's slab; 0: read into the slab.
    mapped_bytes: int = 0
    merge_threads: int = 1  # on the CPU, a tile's chunks are merged on this many threads

    @property
    def total(self) -> int:
        return (
            self.slabs * self.slab_bytes
            + FLOAT32_BYTES * self.work_elems * self.work_factor * self.merge_threads
            + self.factor_bytes
            + 2 * self.scratch
            + self.overhead
            + self.shared_bytes
            + self.slabs * self.mapped_bytes
        )
