"""Several weighted adapters merge to what PEFT's add_weighted_adapter(combination_type="cat") makes of them
(A_i scaled by w_i * s_i, stacked, B_i stacked, scaling 1: W + sum_i w_i s_i B_i A_i), not its default "svd"."""

from __future__ import annotations

import torch
from helpers.adapters import make_adapter
from helpers.models import build_base
from helpers.reference import assert_same_model

import shardmerge


def test_weighted_adapters_equal_peft_add_weighted_adapter_cat(tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = build_base(tmp_path / "base", "llama", torch.float32)
    first = make_adapter(
        base,
        tmp_path / "first",
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dtype=torch.float32,
        seed=1,
    )
    second = make_adapter(
        base,
        tmp_path / "second",
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
        dtype=torch.float32,
        seed=2,
    )
    weights = [0.7, -0.4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(first), adapter_name="first")
    model.load_adapter(str(second), adapter_name="second")
    model.add_weighted_adapter(["first", "second"], weights, "combined", combination_type="cat")
    model.set_adapter("combined")
    reference = model.merge_and_unload(adapter_names=["combined"]).eval()

    out = tmp_path / "out"
    shardmerge.merge(
        {
            "base": str(base),
            "adapters": [{"path": str(first), "weight": weights[0]}, {"path": str(second), "weight": weights[1]}],
            "output": str(out),
            "device": "cpu",
        }
    )
    assert_same_model(out, reference)
