"""What every quantized-checkpoint codec provides, and the block-grid arithmetic they share.

A quantized weight is stored as a codes tensor plus the scale tensors that give the codes their values.
The planner treats it as one logical float tensor (the shape and name a float checkpoint would have);
the executor calls its codec twice per tile: `dequantize` when the tile is read, `requantize` when a
merged tile is written back in the base's format. Everything here is a pure function of tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..safetensors_io import TensorInfo

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E2M1_MAX = 6.0
# e2m1 (FP4) values by nibble: bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Quantized:
    """One quantized weight as a checkpoint stores it."""

    codec: Codec
    name: str  # the logical tensor: what adapters target, and the name written when dequantized
    shape: tuple[int, ...]  # its logical shape
    codes: TensorInfo
    scales: tuple[TensorInfo, ...]  # decode the codes; rewritten when the weight is requantized
    passengers: tuple[TensorInfo, ...] = ()  # e.g. input_scale: kept as stored, dropped when dequantized

    @property
    def logical(self) -> TensorInfo:
        """The logical tensor, whose bytes are the codes'."""
        c = self.codes
        return TensorInfo(self.name, c.dtype, self.shape, c.path, c.offset, c.nbytes)


class Codec:
    """One quantized format. Subclasses find their weights by tensor names and convert row tiles."""

    label = ""  # for messages: "block FP8 (fp8, 128x128)"
    extra_files: tuple[str, ...] = ()  # config files that describe only the quantization

    def __init__(self, ignore: list[str] | None = None):
        self.ignore = list(ignore or [])

    def weights(self, tensors: dict[str, TensorInfo]) -> dict[str, Quantized]:
        """Every quantized weight, keyed by its codes tensor's name."""
        raise NotImplementedError

    def row_block(self, q: Quantized) -> int:
        """Rows one scale block spans: tiles start on multiples of it, so every block is whole in a tile."""
        raise NotImplementedError

    def needs_amax(self, q: Quantized) -> bool:
        """A per-tensor scale: fresh scales need the merged tensor's absolute maximum, from a pre-pass."""
        return False

    def tiled_scales(self, q: Quantized) -> tuple[bool, ...]:
        """Which of q.scales follow the row blocks (scale row i covers rows i*row_block..): those are read and
        rewritten tile by tile, with the tile; the others (one value for the tensor) are held whole."""
        blocks = math.ceil(q.shape[0] / self.row_block(q)) if q.shape else 1
        return tuple(len(s.shape) >= 1 and s.shape[0] == blocks and s.numel > 1 for s in q.scales)

    def dequantize(self, q: Quantized, codes: torch.Tensor, side: list[torch.Tensor], r0: int) -> torch.Tensor:
        """Float32 rows r0:r0+len(codes) of the logical tensor, flattened to (rows, -1). `side` holds the
        scale tensors as stored: a tiled one (tiled_scales) from the row block r0 is counted from, so r0 is
        relative to the first row its rows cover; a whole one as it is."""
        raise NotImplementedError

    def requantize(
        self, q: Quantized, x: torch.Tensor, side: list[torch.Tensor], r0: int, amax: float | None
    ) -> torch.Tensor:
        """Codes (stored dtype, (rows, -1)) for float32 rows r0:.. of the logical tensor; fresh scales for
        those rows' blocks go into `side` (as in `dequantize`) in place, in their stored dtype."""
        raise NotImplementedError

    def decode(self, q: Quantized, codes: torch.Tensor, side: list[torch.Tensor], r0: int, group: int = 1):
        """`dequantize` for a tile whose rows are finer than the codec's: `group` tile rows make one codec row
        (a stack of experts merged along (expert, d1) rows, where the codec's rows are whole experts, as
        TensorTask.quant_group says). r0 and the result count tile rows; tiles hold whole codec rows."""
        rows = codes.shape[0]
        return self.dequantize(q, codes.reshape(rows // group, -1), side, r0 // group).reshape(rows, -1)

    def encode(
        self, q: Quantized, x: torch.Tensor, side: list[torch.Tensor], r0: int, amax: float | None, group: int = 1
    ) -> torch.Tensor:
        """`requantize` for a tile counted in tile rows, as `decode`."""
        rows = x.shape[0]
        return self.requantize(q, x.reshape(rows // group, -1), side, r0 // group, amax).reshape(rows, -1)

    def quantized_module(self, module: str) -> bool:
        """False where the format's own list leaves the module unquantized (transformers' matching rule:
        a prefix up to a module boundary, a regex with that boundary, or a suffix)."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in self.ignore)


# -- scale grids: a tile (rows, cols) whose first row starts a block, and scales (ceil(rows/bh), ceil(cols/bw))
def expand_rows(scale: torch.Tensor, bh: int, rows: int) -> torch.Tensor:
    """Scales per row: (rows, column blocks)."""
    return scale.repeat_interleave(bh, dim=0)[:rows]


def scale_columns_(x: torch.Tensor, row_scales: torch.Tensor, bw: int, divide: bool = False) -> torch.Tensor:
    """x *= (or /=) its block's scale, in place; a ragged last column block is handled apart."""
    full, rem = divmod(x.shape[1], bw)
    op = torch.Tensor.div_ if divide else torch.Tensor.mul_
    if full:
        op(x[:, : full * bw].unflatten(-1, (full, bw)), row_scales[:, :full, None])
    if rem:
        op(x[:, full * bw :], row_scales[:, full:])
    return x


def block_amax(x: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """max |x| per block, (ceil(rows/bh), ceil(cols/bw)); ragged edge blocks cover what is there."""
    rows, cols = x.shape
    a = x.abs()
    full, rem = divmod(cols, bw)
    parts = []
    if full:
        parts.append(a[:, : full * bw].unflatten(-1, (full, bw)).amax(-1))
    if rem:
        parts.append(a[:, full * bw :].amax(-1, keepdim=True))
    per_row = torch.cat(parts, dim=1)
    blocks = math.ceil(rows / bh)
    per_row = F.pad(per_row, (0, 0, 0, blocks * bh - rows))  # zeros never raise a maximum of |x|
    return per_row.view(blocks, bh, -1).amax(dim=1)


def fresh_scale(amax: torch.Tensor, code_max: float, dtype: torch.dtype, power_of_two: bool = False) -> torch.Tensor:
    """amax / code_max per block (an all-zero block gets 1), rounded to how it is stored.

    Stored values are what the codes are computed from: a scale rounded down by bf16 would overflow the
    code range at the block's maximum, which the caller's clamp then saturates by at most half a bf16 ulp.
    """
    scale = torch.where(amax > 0, amax / code_max, torch.ones_like(amax))
    if power_of_two:  # ue8m0: the next power of two up, so no code overflows
        scale = torch.exp2(torch.ceil(torch.log2(scale.clamp_min(torch.finfo(torch.float32).tiny))))
    return scale.to(dtype)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to e4m3 codes; e4m3fn has no infinity, so out-of-range values saturate instead of turning NaN."""
    return x.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_nibbles(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values in [-6, 6] to the nearest e2m1 value (ties to even mantissa), as nibbles."""
    magnitudes = torch.tensor(E2M1_VALUES[:8], dtype=x.dtype, device=x.device)
    a = x.abs().clamp_(max=E2M1_MAX)
    # Midpoints between neighbours; at a tie the even-mantissa neighbour wins (0, 1, 2, 4 of 0..7 index even).
    mids = (magnitudes[1:] + magnitudes[:-1]) / 2
    index = torch.bucketize(a, mids, right=False)  # a == mid goes to the lower neighbour
    tie = (index < 7) & (a == mids[index.clamp(max=6)]) & (index % 2 == 1)
    index = index + tie.to(index.dtype)
    sign = (torch.signbit(x) & (index > 0)).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def e2m1_values(nibbles: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=nibbles.device)
    return lut[nibbles.long()]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(rows, n) bytes -> (rows, 2n) nibbles, low nibble first (the even index)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    pairs = nibbles.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)
