"""FP4 (e2m1) weights, two codes per byte, low nibble first: MXFP4 (gpt-oss experts, a power-of-two
scale per 32 inputs) and NVFP4 (an e4m3 scale per 16 inputs under one float32 scale per tensor), the
latter as ModelOpt and as compressed-tensors write it.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShardmergeError
from ..safetensors_io import TensorInfo
from .base import (
    E2M1_MAX,
    E4M3_MAX,
    Codec,
    Quantized,
    e2m1_nibbles,
    e2m1_values,
    e4m3,
    pack_nibbles,
    unpack_nibbles,
)


def _require(cond: bool, where: TensorInfo, why: str) -> None:
    if not cond:
        raise ShardmergeError(f"{where.path}: {where.name!r} {list(where.shape)} {where.dtype}: {why}")


def fp4_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed codes of x (..., n*g) over per-group scales (..., n): a zero scale gives zero codes."""
    groups = x.unflatten(-1, (scale.shape[-1], -1))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    nibbles = e2m1_nibbles(groups / safe) * (scale > 0).unsqueeze(-1).to(torch.uint8)
    return pack_nibbles(nibbles.flatten(-2))


def fp4_values(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., n*g/2) packed bytes times per-group float32 scales (..., n) -> float32 (..., n*g)."""
    values = e2m1_values(unpack_nibbles(packed)).unflatten(-1, (scale.shape[-1], -1))
    return (values * scale.unsqueeze(-1)).flatten(-2)


class MXFP4(Codec):
    """`quant_method: mxfp4` (gpt-oss): `<p>_blocks` U8 (E, out, in/32, 16) and `<p>_scales` U8 e8m0
    (E, out, in/32) stand for the float `<p>` stored (E, in, out); tiles are whole experts."""

    label = "MXFP4 (mxfp4)"

    def __init__(self, qc: dict):
        super().__init__(qc.get("modules_to_not_convert"))

    def weights(self, tensors):
        found = {}
        for name, t in tensors.items():
            if not name.endswith("_blocks"):
                continue
            logical = name[: -len("_blocks")]
            scales = tensors.get(logical + "_scales")
            _require(scales is not None, t, "MXFP4 blocks without their _scales")
            _require(
                self.quantized_module(logical.rsplit(".", 1)[0]),
                t,
                "MXFP4 blocks in a module the config lists as not quantized",
            )
            _require(
                t.dtype == "U8"
                and scales.dtype == "U8"
                and len(t.shape) == 4
                and t.shape[-1] == 16
                and tuple(t.shape[:-1]) == tuple(scales.shape),
                t,
                f"not MXFP4 blocks for scales {list(scales.shape)}",
            )
            experts, out, groups, _ = t.shape
            found[name] = Quantized(self, logical, (experts, groups * 32, out), t, (scales,))
        return found

    def row_block(self, q):
        return 1

    def dequantize(self, q, codes, side, r0):
        n = codes.shape[0]
        _experts, cols, out = q.shape
        exponents = side[0][r0 : r0 + n].to(torch.float32).sub_(127)
        values = fp4_values(codes.reshape(n, out, cols // 2), torch.exp2(exponents))  # (n, out, in)
        return values.transpose(1, 2).reshape(n, -1)

    def requantize(self, q, x, side, r0, amax):
        n = x.shape[0]
        _, cols, out = q.shape
        stored = x.reshape(n, cols, out).transpose(1, 2).contiguous()  # (n, out, in), as the blocks are laid out
        peak = stored.abs().unflatten(-1, (cols // 32, 32)).amax(-1)
        # The next power of two at or above amax/6, so no code saturates.
        exponent = torch.ceil(torch.log2((peak / E2M1_MAX).clamp_min(2.0**-127))).clamp_(-127, 127)
        side[0][r0 : r0 + n] = (exponent + 127).to(torch.uint8)
        scale = torch.where(peak > 0, torch.exp2(exponent), torch.zeros_like(peak))
        return fp4_codes(stored, scale).reshape(n, -1)


class _NVFP4(Codec):
    """NVFP4: packed codes (out, in/2), `weight_scale` e4m3 (out, in/16), and one float32 tensor scale."""

    codes_name = ""
    global_name = ""
    passenger_names: tuple[str, ...] = ()

    def weights(self, tensors):
        found = {}
        for name, t in tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf != self.codes_name or t.dtype != "U8":
                continue
            scale, tensor_scale = tensors.get(f"{module}.weight_scale"), tensors.get(f"{module}.{self.global_name}")
            _require(
                scale is not None and tensor_scale is not None,
                t,
                f"packed FP4 without weight_scale and {self.global_name} ({self.label})",
            )
            _require(
                self.quantized_module(module),
                t,
                f"packed FP4 in a module the {self.label} config lists as not quantized",
            )
            rows, half = t.shape if len(t.shape) == 2 else (0, 0)
            _require(
                len(t.shape) == 2
                and scale.dtype == "F8_E4M3"
                and tuple(scale.shape) == (rows, 2 * half // 16)
                and 2 * half % 16 == 0
                and math.prod(tensor_scale.shape) == 1,
                t,
                f"not NVFP4 codes for weight_scale {list(scale.shape)} {scale.dtype}",
            )
            passengers = tuple(tensors[f"{module}.{p}"] for p in self.passenger_names if f"{module}.{p}" in tensors)
            found[name] = Quantized(self, f"{module}.weight", (rows, 2 * half), t, (scale, tensor_scale), passengers)
        return found

    def row_block(self, q):
        return 1

    def needs_amax(self, q):
        return True

    def combine(self, block: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
        """Each group's float32 scale from its stored e4m3 block scale and the stored tensor scale."""
        raise NotImplementedError

    def tensor_scale(self, amax: float) -> float:
        """The stored tensor scale that maps the tensor's maximum to the largest block scale times 6."""
        raise NotImplementedError

    def dequantize(self, q, codes, side, r0):
        rows = codes.shape[0]
        return fp4_values(codes, self.combine(side[0][r0 : r0 + rows].to(torch.float32), side[1]))

    def requantize(self, q, x, side, r0, amax):
        rows = x.shape[0]
        side[1].fill_(self.tensor_scale(amax))
        per_tensor = self.combine(torch.ones((), device=x.device), side[1])  # as stored
        block = e4m3(x.abs().unflatten(-1, (-1, 16)).amax(-1) / E2M1_MAX / per_tensor)
        side[0][r0 : r0 + rows] = block
        return fp4_codes(x, self.combine(block.to(torch.float32), side[1]))


class ModelOptNVFP4(_NVFP4):
    """ModelOpt (`quant_method: modelopt`, `quant_algo: NVFP4`, or hf_quant_config.json):
    value = e2m1 * weight_scale * weight_scale_2."""

    codes_name = "weight"
    global_name = "weight_scale_2"
    passenger_names = ("input_scale",)
    label = "NVFP4 (modelopt)"
    extra_files = ("hf_quant_config.json",)

    def combine(self, block, tensor_scale):
        return block * tensor_scale.to(torch.float32).reshape(())

    def tensor_scale(self, amax):
        return amax / (E2M1_MAX * E4M3_MAX) if amax > 0 else 1.0


class CompressedNVFP4(_NVFP4):
    """compressed-tensors `nvfp4-pack-quantized`: value = e2m1 * weight_scale / weight_global_scale
    (the global scale is the reciprocal of ModelOpt's weight_scale_2)."""

    codes_name = "weight_packed"
    global_name = "weight_global_scale"
    passenger_names = ("input_global_scale",)
    label = "NVFP4 (compressed-tensors)"

    def combine(self, block, tensor_scale):
        return block / tensor_scale.to(torch.float32).reshape(())

    def tensor_scale(self, amax):
        return E2M1_MAX * E4M3_MAX / amax if amax > 0 else 1.0
