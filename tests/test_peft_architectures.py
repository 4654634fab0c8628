"""PEFT parity on architectures and adapter configs beyond the Llama-shaped ones: each test builds a tiny random
model of one family, lets PEFT make and merge an adapter on it, and compares shardmerge's output at model level
(every parameter and the logits). Found by sweeping transformers' families against merge_and_unload()."""

from __future__ import annotations

import torch
from helpers.adapters import make_adapter
from helpers.models import build_base
from helpers.moe import moe_config
from helpers.reference import assert_same_model, peft_merged

import shardmerge


def _merge(tmp_path, base, *adapters):
    return shardmerge.merge(
        {"base": str(base), "adapters": [str(a) for a in adapters], "output": str(tmp_path / "out"), "device": "cpu"}
    )


def test_all_linear_on_mixtral_merges_the_router_and_the_experts(tmp_path):
    """On Mixtral, PEFT's all-linear adds target_parameters [gate_up_proj, down_proj, gate.weight]: the experts'
    3-D parameters and the router's 2-D weight, which its ParamWrapper merges as a Linear (W + s * B @ A)."""
    from peft import LoraConfig

    base = build_base(tmp_path / "base", moe_config("mixtral"), torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           dtype=torch.float32)  # fmt: skip
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter]))
