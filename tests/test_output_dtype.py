"""`dtype: bfloat16 | float16 | float32` as a user meets it: the merged values, the stored dtype, and a
config.json that says the dtype the weights are stored in (transformers' `dtype="auto"` and vLLM load in it)."""

import json

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import build_base, random_model
from helpers.plans import run_cli, write_plan
from helpers.reference import assert_same_model, peft_merged
from helpers.vlm import build_vlm, make_vlm_adapter
from peft import LoraConfig
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize(("base_dtype", "out_dtype"), [(torch.bfloat16, "float32"), (torch.float32, "bfloat16")])
def test_a_cast_output_loads_in_its_new_dtype_and_equals_peft_merged_in_float32(tmp_path, base_dtype, out_dtype):
    base = build_base(tmp_path / "base", "llama", base_dtype)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[adapter], output="out", device="cpu",
                      dtype=out_dtype)  # fmt: skip
    assert run_cli(plan, "-q").returncode == 0
    dtype = getattr(torch, out_dtype)
    # PEFT on the base upcast to float32 (exact) merges in float32; the output is that, rounded once
    reference = peft_merged(base, [adapter], dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype="auto")
    assert model.dtype == dtype
    got = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert torch.equal(got[name], param.to(dtype)), name
    tolerance = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 4e-3)}[out_dtype]
    assert_same_model(tmp_path / "out", reference.to(dtype), dtype=dtype, rtol=tolerance[0], atol=tolerance[1])


def test_a_cast_vlm_says_its_new_dtype_in_the_config_and_in_each_sub_config(tmp_path):
    base = build_vlm(tmp_path / "base", "llava", torch.float32)
    adapter = make_vlm_adapter(base, tmp_path / "adapter", "llava", torch.float32)
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[adapter], output="out", device="cpu",
                      dtype="bfloat16")  # fmt: skip
    assert run_cli(plan, "-q").returncode == 0
    before = json.loads((base / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    assert after["dtype"] == "bfloat16"
    for sub in ("text_config", "vision_config"):
        assert "dtype" in before[sub]
        assert after[sub] == {**before[sub], "dtype": "bfloat16"}
    assert {k: v for k, v in after.items() if k not in ("dtype", "text_config", "vision_config")} == {
        k: v for k, v in before.items() if k not in ("dtype", "text_config", "vision_config")
    }


def test_a_bfloat16_cast_keeps_what_transformers_keeps_in_float32_as_peft_saves_it(tmp_path):
    """DeepSeek-V3's router bias (`_keep_in_fp32_modules_strict`): transformers loads it in float32 whatever the
    dtype and save_pretrained writes it so; rounding it to bfloat16 would move the routing scores."""
    from safetensors import safe_open
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                              kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                              head_dim=4, max_position_embeddings=64)  # fmt: skip
    model = random_model(config)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    model.get_buffer(bias).copy_(torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.3 + 1e-3)
    model.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_b_proj"], target_parameters=["experts.down_proj"])
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", lora, dtype=torch.float32)
    plan = write_plan(tmp_path / "plan.yaml", base=tmp_path / "base", adapters=[adapter], output="out",
                      dtype="bfloat16")  # fmt: skip
    assert run_cli(plan, "-q").returncode == 0
    peft_out = tmp_path / "peft"
    peft_merged(tmp_path / "base", [adapter], dtype=torch.bfloat16).save_pretrained(peft_out)
    stored = {}
    for out in (tmp_path / "out", peft_out):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            stored[out] = (f.get_slice(bias).get_dtype(), f.get_tensor(bias))
    assert stored[tmp_path / "out"][0] == stored[peft_out][0] == "F32"
    assert torch.equal(stored[tmp_path / "out"][1], stored[peft_out][1])
    assert torch.equal(stored[peft_out][1], model.get_buffer(bias))
