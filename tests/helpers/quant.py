"""Quantized tiny models for the quantized-base tests, with the tests' own float64 reference quantizers.

Nothing here uses shardmerge: each format's quantize/dequantize is written from its definition (FORMATS.md
section 3, checked against transformers and compressed-tensors), in float64, whole tensor at a time. A
checkpoint is a float model whose chosen Linear weights are replaced by the format's tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.models import SINGLE_NAME, tiny_config, write_model

E4M3_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


# -- reference arithmetic, float64 ------------------------------------------------------------------------
def _pad_to(w: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    rows, cols = w.shape
    return torch.nn.functional.pad(w, (0, -cols % bw, 0, -rows % bh))


def grid_amax(w: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    p = _pad_to(w.abs(), bh, bw)
    return p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).amax(dim=(1, 3))


def expand(scale: torch.Tensor, bh: int, bw: int, shape) -> torch.Tensor:
    return scale.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: shape[0], : shape[1]]


def fp8_quantize(w: torch.Tensor, bh: int, bw: int, scale_dtype: torch.dtype, pow2: bool = False):
    """Codes and stored scales on a (bh, bw) grid: scale amax/448 (zero block: 1), rounded as stored,
    codes from the stored scale."""
    amax = grid_amax(w, bh, bw)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if pow2:
        scale = 2.0 ** torch.ceil(torch.log2(scale))
    stored = scale.to(scale_dtype)
    codes = (w / expand(stored.double(), bh, bw, w.shape)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, stored


def fp8_dequantize(codes, stored, bh, bw, round_to=None):
    x = codes.double() * expand(stored.double(), bh, bw, codes.shape)
    return x if round_to is None else x.to(round_to).double()


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Nibbles of the nearest e2m1 value (|x| <= 6 assumed clamped), ties to the even index."""
    a = x.abs().clamp(max=6.0)
    dist = (a.unsqueeze(-1) - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = torch.where(dist == best, torch.arange(8), torch.full_like(dist, 99, dtype=torch.long))
    even_first = torch.where(candidates % 2 == 0, candidates, candidates + 100)
    index = even_first.min(-1).values
    index = torch.where(index >= 100, index - 100, index)
    sign = ((x < 0) & (index > 0)).long() * 8
    return (index + sign).to(torch.uint8)


def e2m1_value(nibbles: torch.Tensor) -> torch.Tensor:
    v = E2M1[(nibbles & 7).long()]
    return torch.where(nibbles >= 8, -v, v)


def pack(nibbles: torch.Tensor) -> torch.Tensor:
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def nvfp4_quantize(w: torch.Tensor):
    """(codes (rows, cols/2) U8, block scales e4m3 (rows, cols/16), tensor scale s2): value = e2m1*bs*s2."""
    s2 = torch.tensor(w.abs().max().item() / (6 * E4M3_MAX), dtype=torch.float32)
    groups = w.reshape(w.shape[0], -1, 16)
    bs = (groups.abs().amax(-1) / 6 / s2.double()).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    combined = bs.double() * s2.double()
    safe = torch.where(combined > 0, combined, torch.ones_like(combined))
    nib = e2m1_round(groups / safe.unsqueeze(-1)) * (combined > 0).unsqueeze(-1).to(torch.uint8)
    return pack(nib.reshape(w.shape)), bs, s2


def nvfp4_dequantize(codes, bs, s2):
    values = e2m1_value(unpack(codes)).reshape(codes.shape[0], -1, 16)
    return (values * (bs.double() * s2.double()).unsqueeze(-1)).reshape(codes.shape[0], -1)


def mxfp4_quantize(w: torch.Tensor):
    """w (E, out, in) -> blocks U8 (E, out, in/32, 16), e8m0 scales U8 (E, out, in/32)."""
    groups = w.reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2((amax / 6).clamp_min(2.0**-127))).clamp(-127, 127)
    scale = torch.where(amax > 0, 2.0**exponent, torch.zeros_like(amax))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    nib = e2m1_round(groups / safe.unsqueeze(-1)) * (scale > 0).unsqueeze(-1).to(torch.uint8)
    return pack(nib.flatten(-2)).reshape(*groups.shape[:-1], 16), (exponent + 127).to(torch.uint8)


def mxfp4_dequantize(blocks, scales):
    values = e2m1_value(unpack(blocks))  # (E, out, G, 32)
    return (values * 2.0 ** (scales.double() - 127).unsqueeze(-1)).flatten(-2)


# -- formats: what a checkpoint stores for one quantized Linear weight, and how to read it back -----------
@dataclass
class Format:
    """One quantized format as the tests build it: config, the tensors per weight, and their dequantization."""

    key: str
    config: dict
    bits: int = 8
    extra_files: dict = field(default_factory=dict)

    def quantize(self, module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        kind, *rest = self.key.split(":")
        if kind == "nvfp4-modelopt":
            codes, bs, s2 = nvfp4_quantize(w)
            return {
                f"{module}.weight": codes,
                f"{module}.weight_scale": bs,
                f"{module}.weight_scale_2": s2,
                f"{module}.input_scale": torch.tensor(0.5),
            }
        if kind == "nvfp4-ct":
            codes, bs, s2 = nvfp4_quantize(w)
            return {
                f"{module}.weight_packed": codes,
                f"{module}.weight_scale": bs,
                f"{module}.weight_global_scale": (1.0 / s2).reshape(1),
            }
        bh, bw, scale_dtype, pow2 = self.grid(w.shape)
        codes, scale = fp8_quantize(w, bh, bw, scale_dtype, pow2)
        scale_name = "weight_scale_inv" if kind == "fp8" else "weight_scale"
        if kind == "ct" and rest[0] == "tensor":
            scale = scale.reshape(1)
        out = {f"{module}.weight": codes, f"{module}.{scale_name}": scale}
        if kind == "ct" and rest[0] == "tensor":
            out[f"{module}.input_scale"] = torch.tensor([0.25])
        return out

    def grid(self, shape):
        kind, *rest = self.key.split(":")
        dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
        if kind == "fp8":
            return 128, 128, dtypes[rest[0]], rest[-1] == "ue8m0"
        if kind == "fbgemm":
            return 1, shape[1], torch.float32, False
        strategy, dtype = rest
        grids = {"tensor": (shape[0], shape[1]), "channel": (1, shape[1]), "group": (1, 32), "block": (128, 128)}
        return (*grids[strategy], dtypes[dtype], False)

    def dequantize(self, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        kind = self.key.split(":")[0]
        if kind == "nvfp4-modelopt":
            return nvfp4_dequantize(
                tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"]
            )
        if kind == "nvfp4-ct":
            return nvfp4_dequantize(
                tensors[f"{module}.weight_packed"],
                tensors[f"{module}.weight_scale"],
                1.0 / tensors[f"{module}.weight_global_scale"].double(),
            )
        codes = tensors[f"{module}.weight"]
        bh, bw, _, _ = self.grid(codes.shape)
        scale = tensors[f"{module}.{'weight_scale_inv' if kind == 'fp8' else 'weight_scale'}"]
        round_to = scale.dtype if kind == "ct" else None  # compressed-tensors dequantizes in the scale's dtype
        return fp8_dequantize(codes, scale.reshape(-1, math.ceil(codes.shape[1] / bw)), bh, bw, round_to)

    def requantize(self, module: str, w: torch.Tensor) -> torch.Tensor:
        """The test's own requantization of a float64 weight, dequantized again."""
        return self.dequantize(module, self.quantize(module, w))

    def names(self, module: str) -> list[str]:
        return sorted(self.quantize(module, torch.ones(32, 32)))


def formats() -> dict[str, Format]:
    fp8 = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"],
    }

    def ct(strategy: str) -> dict:
        weights = {
            "num_bits": 8,
            "type": "float",
            "strategy": strategy,
            "symmetric": True,
            "dynamic": False,
            "group_size": 32 if strategy == "group" else None,
            "block_structure": [128, 128] if strategy == "block" else None,
        }
        inputs = (
            {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
            if strategy == "tensor"
            else None
        )
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
            "ignore": ["lm_head"],
        }

    nvfp4_ct = {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "float",
                    "strategy": "tensor_group",
                    "group_size": 16,
                    "symmetric": True,
                    "dynamic": False,
                },
            }
        },
    }
    modelopt = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    found = [
        Format("fp8:f32", fp8),
        Format("fp8:bf16", fp8),
        Format("fp8:f32:ue8m0", {**fp8, "scale_fmt": "ue8m0"}),
        Format("ct:channel:bf16", ct("channel")),
        Format("ct:block:f32", ct("block")),
        Format("ct:group:bf16", ct("group")),
        Format("ct:tensor:f32", ct("tensor")),
        Format("fbgemm:f32", {"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]}),
        Format(
            "nvfp4-modelopt",
            modelopt,
            bits=4,
            extra_files={
                "hf_quant_config.json": {
                    "producer": {"name": "modelopt"},
                    "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]},
                }
            },
        ),
        Format("nvfp4-ct", nvfp4_ct, bits=4),
    ]
    return {f.key: f for f in found}


# -- checkpoints -------------------------------------------------------------------------------------------
def tiny_llama_config(hidden: int = 256, intermediate: int = 320, layers: int = 1):
    """Hidden 256 (two 128-blocks) and an intermediate size that is not a multiple of 128 (ragged blocks)."""
    config = tiny_config("llama")
    config.update(
        {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers, "head_dim": 64}
    )
    return config


def qwen3_moe_config(moe_intermediate: int = 320):
    """Hidden 256 (two 128-blocks); experts of 320 rows or columns (a ragged third block). Every token goes to
    every expert, so a rounding difference cannot flip a routing choice and logits compare continuously."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=4,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def gpt_oss_config():
    """Experts gate_up (E, 64, 192) and down (E, 96, 64): 32-blocks along both inputs, no square expert."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=4,
        max_position_embeddings=64,
        layer_types=["full_attention"],
        tie_word_embeddings=False,
    )


# gpt-oss's quantization_config as the Hub checkpoints carry it: experts in MXFP4, the rest bf16
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def quantized_linears(model) -> list[str]:
    """Every Linear in the decoder layers (lm_head stays float, as real checkpoints keep it)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def write_quantized(directory: Path, model, fmt: Format) -> dict[str, torch.Tensor]:
    """The model's checkpoint with every decoder Linear in `fmt`, the rest bf16; returns the tensors."""
    quantized = set(quantized_linears(model))
    tensors = {}
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            tensors.update(fmt.quantize(module, p.detach().double()))
        else:
            tensors[name] = p.detach().to(torch.bfloat16).contiguous()
    config = {**model.config.to_dict(), "dtype": "bfloat16", "quantization_config": fmt.config}
    write_model(directory, tensors, shards=1, config=config, files=fmt.extra_files)
    return tensors


def write_mxfp4_experts(directory: Path, model, experts: tuple[str, ...], keep_float: list[str]) -> Path:
    """`model` as save_pretrained writes it (one file), with every expert parameter whose name ends with one of
    `experts` stored as MXFP4 blocks and scales, as gpt-oss checkpoints store them, and a quantization_config
    whose modules_to_not_convert is `keep_float`."""
    from safetensors.torch import load_file

    model.save_pretrained(str(directory))
    state = load_file(str(directory / SINGLE_NAME))
    for name in [n for n in state if n.endswith(experts)]:
        blocks, scales = mxfp4_quantize(state.pop(name).double().transpose(1, 2))  # stored (E, in, out)
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": keep_float}
    return write_model(directory, state, shards=1, config=config)
