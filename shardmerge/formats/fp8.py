"""FP8 (e4m3) weights with a grid of scales: block FP8 (DeepSeek/Qwen `fp8`), compressed-tensors
float-quantized, and fbgemm_fp8 per row. They differ in tensor names, grid and how a scale combines
with a code; the grid arithmetic is shared.

Every scale here multiplies its codes (DeepSeek's `weight_scale_inv` too, despite its name). A grid is
(bh, bw): the rows and columns one scale covers, the last block of each axis possibly ragged.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShardmergeError
from ..safetensors_io import TensorInfo
from .base import (
    E4M3_MAX,
    Codec,
    Quantized,
    block_amax,
    e4m3,
    expand_rows,
    fresh_scale,
    scale_columns_,
)

_SCALE_DTYPES = {"F32", "BF16", "F16", "F8_E8M0", "U8"}  # the last two: ue8m0, as a dtype or as bytes
_POWER_OF_TWO = (torch.uint8, torch.float8_e8m0fnu)


def decode_scale(stored: torch.Tensor) -> torch.Tensor:
    """Scales as float32; a ue8m0 scale stored as bytes is 2^(byte - 127)."""
    if stored.dtype == torch.uint8:
        return torch.exp2(stored.to(torch.float32) - 127)
    return stored.to(torch.float32)


def encode_like(scale: torch.Tensor, stored_dtype: torch.dtype) -> torch.Tensor:
    if stored_dtype == torch.uint8:  # power-of-two scales: the exponent byte
        return (torch.log2(scale).round() + 127).clamp_(0, 254).to(torch.uint8)
    return scale.to(stored_dtype)


def grid_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, grid: tuple[int, int], r0: int, round_to: torch.dtype | None = None
) -> torch.Tensor:
    """codes * scale per block for a tile starting at row r0; `round_to` rounds the products to the dtype
    the format dequantizes in (compressed-tensors: the scale's)."""
    bh, bw = grid
    rows = codes.shape[0]
    s = decode_scale(scale[r0 // bh : math.ceil((r0 + rows) / bh)])
    x = scale_columns_(codes.to(torch.float32), expand_rows(s, bh, rows), bw)
    return x if round_to in (None, torch.float32) else x.to(round_to).to(torch.float32)


def grid_requantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    grid: tuple[int, int],
    r0: int,
    power_of_two: bool = False,
    amax: float | None = None,
) -> torch.Tensor:
    """Fresh scales for the tile's blocks (or from the tensor's `amax` for a per-tensor scale), written
    into `scale` as stored; codes from those stored values."""
    bh, bw = grid
    rows = x.shape[0]
    b0, b1 = r0 // bh, math.ceil((r0 + rows) / bh)
    if amax is None:
        peak = block_amax(x, bh, bw)
    else:
        peak = torch.full((b1 - b0, scale.shape[-1] if scale.dim() else 1), amax, dtype=torch.float32, device=x.device)
    wanted = torch.float32 if scale.dtype == torch.uint8 else scale.dtype
    stored = fresh_scale(peak, E4M3_MAX, wanted, power_of_two or scale.dtype in _POWER_OF_TWO)
    scale[b0:b1] = encode_like(stored.to(torch.float32), scale.dtype).reshape(scale[b0:b1].shape)
    s = decode_scale(scale[b0:b1]).reshape(b1 - b0, -1)
    return e4m3(scale_columns_(x.clone(), expand_rows(s, bh, rows), bw, divide=True))


def _is_block(block) -> bool:
    return (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)
    )


def _require(cond: bool, where: TensorInfo, why: str) -> None:
    if not cond:
        raise ShardmergeError(f"{where.path}: {where.name!r} {list(where.shape)} {where.dtype}: {why}")


class _GridFP8(Codec):
    """FP8 codes `<module>.weight` with one scale tensor `<module>.<scale_name>` on a grid."""

    scale_name = ""
    passenger_names: tuple[str, ...] = ()
    power_of_two = False
    round_to_scale_dtype = False

    def weights(self, tensors: dict[str, TensorInfo]) -> dict[str, Quantized]:
        found = {}
        for name, t in tensors.items():
            if not name.endswith(".weight") or t.dtype != "F8_E4M3":
                continue
            module = name[: -len(".weight")]
            scale = tensors.get(f"{module}.{self.scale_name}")
            _require(scale is not None, t, f"an FP8 weight without its {self.scale_name} ({self.label})")
            _require(
                self.quantized_module(module),
                t,
                f"an FP8 weight in a module the {self.label} config lists as not quantized",
            )
            _require(len(t.shape) == 2, t, f"{self.label} weights must be 2-D here")
            _require(scale.dtype in _SCALE_DTYPES, scale, f"not a scale dtype ({', '.join(sorted(_SCALE_DTYPES))})")
            self.grid(t.shape, scale)  # refuses a grid that does not fit
            passengers = tuple(tensors[f"{module}.{p}"] for p in self.passenger_names if f"{module}.{p}" in tensors)
            found[name] = Quantized(self, name, t.shape, t, (scale,), passengers)
        return found

    def grid(self, shape: tuple[int, ...], scale: TensorInfo) -> tuple[int, int]:
        raise NotImplementedError

    def row_block(self, q: Quantized) -> int:
        # One scale for the whole tensor: any tile works (requantizing takes the pre-pass's maximum).
        return 1 if self.needs_amax(q) else self.grid(q.shape, q.scales[0])[0]

    def needs_amax(self, q: Quantized) -> bool:
        return math.prod(q.scales[0].shape) == 1 and math.prod(q.shape) > 1

    def dequantize(self, q, codes, side, r0):
        round_to = side[0].dtype if self.round_to_scale_dtype and side[0].dtype not in _POWER_OF_TWO else None
        grid = self.grid(q.shape, q.scales[0])
        return grid_dequantize(codes, side[0].reshape(-1, math.ceil(q.shape[1] / grid[1])), grid, r0, round_to)

    def requantize(self, q, x, side, r0, amax):
        grid = self.grid(q.shape, q.scales[0])
        scale = side[0].view(-1, math.ceil(q.shape[1] / grid[1]))  # the side's block rows (all, or a tile's)
        return grid_requantize(x, scale, grid, r0, self.power_of_two, amax if self.needs_amax(q) else None)


class BlockFP8(_GridFP8):
    """`quant_method: fp8` (transformers FineGrainedFP8): `weight_scale_inv` per weight_block_size block
    (DeepSeek-V3 F32, Qwen3-FP8 BF16/F16); `scale_fmt: ue8m0` makes every scale a power of two."""

    scale_name = "weight_scale_inv"
    passenger_names = ("activation_scale", "input_scale")

    def __init__(self, qc: dict):
        super().__init__(qc.get("modules_to_not_convert") or qc.get("ignored_layers"))
        block = qc.get("weight_block_size")
        if block is not None and not _is_block(block):
            raise ShardmergeError(f"weight_block_size {block!r} is not two positive integers (rows, columns)")
        self.block = tuple(block) if block else None
        self.power_of_two = qc.get("scale_fmt") == "ue8m0"
        self.label = f"block FP8 (fp8, {'x'.join(map(str, block)) if block else 'per tensor'}" + (
            ", ue8m0)" if self.power_of_two else ")"
        )

    def grid(self, shape, scale):
        rows, cols = shape
        if self.block is None or math.prod(scale.shape) == 1:
            _require(math.prod(scale.shape) == 1, scale, "a per-tensor FP8 scale must hold one value")
            return rows, cols
        bh, bw = self.block
        _require(
            tuple(scale.shape) == (math.ceil(rows / bh), math.ceil(cols / bw)),
            scale,
            f"does not match weight {list(shape)} on a {bh}x{bw} block grid",
        )
        return bh, bw


class CompressedFP8(_GridFP8):
    """compressed-tensors `float-quantized`: `weight_scale` per tensor (1), channel (out, 1), group
    (out, in/g) or block (ceil(out/bh), ceil(in/bw)); codes are dequantized in the scale's dtype."""

    scale_name = "weight_scale"
    passenger_names = ("input_scale", "weight_zero_point", "input_zero_point")
    round_to_scale_dtype = True

    def __init__(self, qc: dict):
        super().__init__(qc.get("ignore"))
        self.block = None
        for group in (qc.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            if weights.get("num_bits") != 8 or weights.get("type") != "float":
                raise ShardmergeError(
                    f"compressed-tensors weights of {weights.get('num_bits')} bits, type "
                    f"{weights.get('type')!r} are not supported (only 8-bit float)"
                )
            if weights.get("block_structure"):
                self.block = tuple(weights["block_structure"])
        self.label = "compressed-tensors FP8 (float-quantized)"

    def grid(self, shape, scale):
        rows, cols = shape
        s = tuple(scale.shape)
        if math.prod(s) == 1:
            return rows, cols
        if s == (rows, 1):
            return 1, cols
        if len(s) == 2 and s[0] == rows and cols % s[1] == 0:
            return 1, cols // s[1]
        if self.block and s == (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])):
            return self.block
        _require(False, scale, f"is not a per-tensor, channel, group or block scale of weight {list(shape)}")
        return rows, cols


class FbgemmFP8(_GridFP8):
    """`quant_method: fbgemm_fp8`: `weight_scale` (out, 1) float32, one scale per output row."""

    scale_name = "weight_scale"
    label = "fbgemm_fp8 (per row)"

    def __init__(self, qc: dict):
        super().__init__(qc.get("modules_to_not_convert"))

    def grid(self, shape, scale):
        _require(tuple(scale.shape) == (shape[0], 1), scale, f"is not a per-row scale of weight {list(shape)}")
        return 1, shape[1]
