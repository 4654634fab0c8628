"""Quantized bases: merged into their own format (dtype: keep) or dequantized to a float dtype, against the
tests' float64 reference quantizers (tests/helpers/quant.py) and against PEFT and transformers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter, write_adapter
from helpers.models import quiet, random_model, write_model
from helpers.plans import run_cli, write_plan
from helpers.quant import (
    MXFP4_CONFIG,
    Format,
    formats,
    gpt_oss_config,
    mxfp4_dequantize,
    mxfp4_quantize,
    quantized_linears,
    tiny_llama_config,
    write_mxfp4_experts,
    write_quantized,
)
from helpers.reference import peft_merged, rounding_tolerance
from safetensors.torch import load_file

from shardmerge import ShardmergeError, merge

FORMATS = formats()
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # gate_proj: ragged rows; down_proj: ragged columns
SCALING = 2.0  # lora_alpha 16 / r 8


def make_lora(model, directory: Path, std: float = 0.02) -> Path:
    """A LoRA (r=8, alpha=16) on TARGETS of the model in memory, every LoRA tensor ~ N(0, std^2)."""
    from peft import LoraConfig

    return make_adapter(model, directory, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), std=std)


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> float64 scaling * B @ A, from the saved adapter."""
    state = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = SCALING * b.double() @ a.double()
    return out


@dataclass
class Case:
    fmt: Format
    base: Path
    tensors: dict[str, torch.Tensor]  # the base checkpoint's
    adapter: Path
    modules: list[str]  # the quantized Linear modules


def build_case(tmp_path: Path, fmt_key: str, std: float = 0.02, config=None) -> Case:
    config = config or tiny_llama_config()
    model = random_model(config)
    fmt = FORMATS[fmt_key]
    base = tmp_path / "base"
    tensors = write_quantized(base, model, fmt)
    adapter = make_lora(random_model(config), tmp_path / "adapter", std)
    return Case(fmt, base, tensors, adapter, quantized_linears(model))


def run_merge(base: Path, adapter: Path, out: Path, **options):
    return merge({"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(out), **options})


def assert_requantized_no_worse_than_the_reference(c: Case, out_dir: Path, report) -> None:
    """Every merged weight dequantizes no further from the exact float64 merge than the tests' own
    requantization of that merge (1.5x); names, dtypes (scales too) and shapes are the base's."""
    out = load_file(str(out_dir / "model.safetensors"))
    assert sorted(out) == sorted(c.tensors)
    for name, t in out.items():
        assert (t.dtype, t.shape) == (c.tensors[name].dtype, c.tensors[name].shape), name
    for module, delta in deltas(c.adapter).items():
        base_w = c.fmt.dequantize(module, c.tensors)
        exact = base_w + delta
        reference_error = (c.fmt.requantize(module, exact) - exact).norm()
        error = (c.fmt.dequantize(module, out) - exact).norm()
        assert error <= 1.5 * reference_error + 1e-9, (module, error, reference_error)
        if c.fmt.bits == 8:  # FP8 keeps most of this delta; FP4's rounding error is larger than the delta itself
            assert error < (base_w - exact).norm(), module
        name = f"{module}.weight" if f"{module}.weight" in out else f"{module}.weight_packed"
        assert 0 < report.delta_survival[name] <= 1.5


@pytest.mark.parametrize("fmt_key", list(FORMATS))
def test_keep_requantizes_merged_weights_no_worse_than_the_reference(tmp_path, fmt_key):
    c = build_case(tmp_path, fmt_key)
    report = run_merge(c.base, c.adapter, tmp_path / "out")
    assert_requantized_no_worse_than_the_reference(c, tmp_path / "out", report)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt_key", ["fp8:bf16", "ct:tensor:f32", "nvfp4-modelopt"])
def test_keep_requantizes_on_the_gpu_no_worse_than_the_reference(tmp_path, fmt_key):
    c = build_case(tmp_path, fmt_key)
    report = run_merge(c.base, c.adapter, tmp_path / "out", device="cuda")
    assert_requantized_no_worse_than_the_reference(c, tmp_path / "out", report)


@pytest.mark.parametrize("fmt_key", ["fp8:bf16", "ct:tensor:f32", "nvfp4-modelopt"])
def test_keep_copies_untouched_quantized_tensors_and_config_byte_for_byte(tmp_path, fmt_key):
    c = build_case(tmp_path, fmt_key)
    run_merge(c.base, c.adapter, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    merged = set(deltas(c.adapter))
    untouched = [m for m in c.modules if m not in merged]
    assert untouched
    for module in untouched:
        for name in c.fmt.names(module):
            assert out[name].reshape(-1).view(torch.uint8).equal(c.tensors[name].reshape(-1).view(torch.uint8)), name
    for module in merged:  # activation scales describe the layer's input: a merge leaves them as they were
        for name in c.fmt.names(module):
            if "input" in name:
                assert out[name].equal(c.tensors[name]), name
    assert (tmp_path / "out" / "config.json").read_bytes() == (c.base / "config.json").read_bytes()
    for extra in c.fmt.extra_files:
        assert (tmp_path / "out" / extra).read_bytes() == (c.base / extra).read_bytes()


def _peft_reference(config, tensors, fmt, adapter, modules) -> tuple[torch.Tensor, dict, dict]:
    """PEFT's merge into a bf16 model holding the dequantized base weights: logits, parameters, and the
    float64 bound |W| + |s| |B| @ |A| on what PEFT rounds, per parameter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {}
    for name in model.state_dict():
        module = name.rsplit(".", 1)[0]
        quantized = module in modules and name.endswith(".weight")
        state[name] = fmt.dequantize(module, tensors).to(torch.bfloat16) if quantized else tensors[name]
    model.load_state_dict(state)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    mag = {name: p.double().abs() for name, p in state.items()}
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            mag[f"{module}.weight"] += SCALING * b.double().abs() @ a.double().abs()
    merged = peft_merged(model, [adapter])
    with torch.no_grad():
        return merged(INPUT_IDS).logits.float(), merged.state_dict(), mag


INPUT_IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt_key", ["fp8:f32", "ct:channel:bf16", "nvfp4-modelopt"])
def test_bfloat16_output_loads_in_plain_transformers_and_matches_peft(tmp_path, fmt_key):
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    c = build_case(tmp_path, fmt_key, config=config)
    run_merge(c.base, c.adapter, tmp_path / "out", dtype="bfloat16")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "bfloat16"
    assert not (tmp_path / "out" / "hf_quant_config.json").exists()
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert not any("scale" in name or name.endswith("_packed") for name in out)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        logits = loaded(INPUT_IDS).logits.float()
    expected, peft_state, mag = _peft_reference(config, c.tensors, c.fmt, c.adapter, c.modules)
    for name, p in loaded.state_dict().items():
        tolerance = rounding_tolerance(torch.bfloat16, peft_state[name].double(), mag[name], steps=1)
        assert ((p.double() - peft_state[name].double()).abs() <= tolerance).all(), name
    assert torch.allclose(logits, expected, atol=0.05 * expected.abs().max().item())


def test_bfloat16_output_dequantizes_unmerged_weights_too(tmp_path):
    c = build_case(tmp_path, "fp8:bf16")
    run_merge(c.base, c.adapter, tmp_path / "out", dtype="float32")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for module in set(c.modules) - set(deltas(c.adapter)):
        assert torch.equal(out[f"{module}.weight"].double(), c.fmt.dequantize(module, c.tensors)), module


def _survival(out_w: torch.Tensor, base_w: torch.Tensor, delta: torch.Tensor) -> float:
    return ((out_w - base_w).norm() / delta.norm()).item()


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_delta_survival_matches_a_direct_computation(tmp_path, dtype):
    c = build_case(tmp_path, "fp8:f32", std=0.004)
    report = run_merge(c.base, c.adapter, tmp_path / "out", dtype=dtype)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(report.delta_survival) == sorted(f"{m}.weight" for m in deltas(c.adapter))
    for module, delta in deltas(c.adapter).items():
        base_w = c.fmt.dequantize(module, c.tensors)
        out_w = c.fmt.dequantize(module, out) if dtype == "keep" else out[f"{module}.weight"].double()
        assert report.delta_survival[f"{module}.weight"] == pytest.approx(_survival(out_w, base_w, delta), rel=1e-3)


def test_delta_survival_of_a_bf16_base_matches_a_direct_computation(tmp_path):
    config = tiny_llama_config()
    model = random_model(config)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    base = write_model(tmp_path / "base", tensors, shards=1, config=model.config.to_dict())
    adapter = make_lora(random_model(config), tmp_path / "adapter", std=0.004)
    report = run_merge(base, adapter, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for module, delta in deltas(adapter).items():
        name = f"{module}.weight"
        direct = _survival(out[name].double(), tensors[name].double(), delta)
        assert report.delta_survival[name] == pytest.approx(direct, rel=1e-3)


def test_rounded_away_deltas_warn_once_from_the_cli_and_never_from_the_library(tmp_path, capsys):
    c = build_case(tmp_path, "fp8:f32", std=0.0005)
    report = run_merge(c.base, c.adapter, tmp_path / "lib")
    assert capsys.readouterr().err == ""
    assert len(report.warnings) == 1 and "dtype: bfloat16" in report.warnings[0]
    plan = write_plan(tmp_path / "plan.yaml", base=c.base, adapters=[{"path": c.adapter}], output=tmp_path / "cli")
    result = run_cli(plan, "--quiet", "--report-json", tmp_path / "report.json")
    assert result.returncode == 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardmerge: warning:") and f"{len(TARGETS)} of {len(TARGETS)}" in err[0]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["delta_survival"] == pytest.approx(report.delta_survival)
    assert all(share < 0.5 for share in saved["delta_survival"].values())


@pytest.mark.parametrize("fmt_key", ["fp8:bf16", "ct:tensor:f32"])  # block scales; one scale (a pre-pass)
def test_a_quantized_tensor_larger_than_max_memory_merges_within_it(tmp_path, fmt_key):
    fmt = FORMATS[fmt_key]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24576, 1000, generator=g, dtype=torch.float64) * 0.05  # 24 MB of FP8, ragged columns
    tensors = fmt.quantize("layer.proj", w)
    base = write_model(tmp_path / "base", tensors, shards=1, config={"quantization_config": fmt.config})
    a = torch.randn(4, 1000, generator=g) * 0.05
    b = torch.randn(24576, 4, generator=g) * 0.05
    lora = {"base_model.model.layer.proj.lora_A.weight": a, "base_model.model.layer.proj.lora_B.weight": b}
    adapter = write_adapter(tmp_path / "adapter", lora, r=4, lora_alpha=8, target_modules=["proj"])
    budget = 22 * 2**20  # 16 MiB of fixed runtime overhead, 6 MiB for buffers
    report = run_merge(base, adapter, tmp_path / "out", max_memory=budget)
    assert tensors["layer.proj.weight"].numel() > budget and 0 < report.peak_budget_bytes <= budget
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    exact = fmt.dequantize("layer.proj", tensors) + 2.0 * b.double() @ a.double()
    reference_error = (fmt.requantize("layer.proj", exact) - exact).norm()
    assert (fmt.dequantize("layer.proj", out) - exact).norm() <= 1.5 * reference_error


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_verify_with_the_plan_accepts_quantized_outputs_and_catches_a_changed_code(tmp_path, dtype):
    from safetensors.torch import save_file

    from shardmerge.verify import verify

    c = build_case(tmp_path, "fp8:bf16")
    plan = write_plan(
        tmp_path / "plan.yaml", base=c.base, adapters=[{"path": c.adapter}], output=tmp_path / "o", dtype=dtype
    )
    assert run_cli(plan, "--quiet").returncode == 0
    assert verify(str(tmp_path / "o"), plan=str(plan)) == []
    shard = tmp_path / "o" / "model.safetensors"
    out = load_file(str(shard))
    name = "model.layers.0.self_attn.q_proj.weight"
    out[name] = (out[name].float() * 1.5).to(out[name].dtype)
    save_file(out, str(tmp_path / "changed.safetensors"))
    (tmp_path / "changed.safetensors").replace(shard)
    from shardmerge.verify import _recompute

    assert any(name in p for p in _recompute(tmp_path / "o", str(plan), samples=8, max_memory=None))


def test_transformers_dequantizes_the_kept_fp8_output_as_the_reference_does(tmp_path):
    """transformers' FineGrainedFP8 dequantizes on a CPU; its grid must divide the weights, so no ragged blocks."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(intermediate=384)
    c = build_case(tmp_path, "fp8:f32", config=config)
    run_merge(c.base, c.adapter, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).state_dict()
    for module, delta in deltas(c.adapter).items():
        expected = c.fmt.dequantize(module, out)  # the float64 reference dequantization of what was written
        assert torch.allclose(loaded[f"{module}.weight"].double(), expected, rtol=2**-20, atol=0), module
        exact = c.fmt.dequantize(module, c.tensors) + delta
        reference_error = (c.fmt.requantize(module, exact) - exact).norm()
        assert (loaded[f"{module}.weight"].double() - exact).norm() <= 1.5 * reference_error


_INT4_GROUP = {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}}
_ASYMMETRIC_FP8 = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False}}
_ASYM_FP4 = {
    "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": False}
}


def _merge_with_quantization_config(tmp_path, quantization_config):
    """A quantized case whose config.json says `quantization_config`, merged from the CLI: (case, result)."""
    c = build_case(tmp_path, "fp8:f32")
    config = json.loads((c.base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (c.base / "config.json").write_text(json.dumps(config))
    plan = write_plan(tmp_path / "plan.yaml", base=c.base, adapters=[{"path": c.adapter}], output=tmp_path / "o")
    return c, run_cli(plan, "--quiet")


@pytest.mark.parametrize(
    "quantization_config, named",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "GPTQ"),
        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "AWQ"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes"),
        (  # Kimi K2's experts: int4 packed eight to an int32
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": _INT4_GROUP}},
            "compressed-tensors format pack-quantized",
        ),
        ({"quant_method": "someday", "bits": 4}, "unknown quant_method 'someday'"),
        (  # compressed-tensors dequantizes (code - weight_zero_point) * scale
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {"g": _ASYMMETRIC_FP8},
            },
            "asymmetric compressed-tensors weights",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"g": _ASYM_FP4}},
            "asymmetric compressed-tensors weights",
        ),
    ],
)
def test_unsupported_quantization_is_refused_in_one_line_naming_it(tmp_path, quantization_config, named):
    _, result = _merge_with_quantization_config(tmp_path, quantization_config)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize(
    "quantization_config, field",
    [
        ([{"quant_method": "fp8"}], "quantization_config is not a JSON object"),
        ("fp8", "quantization_config is not a JSON object"),
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size [0, 128]"),
        ({"quant_method": "fp8", "weight_block_size": "128"}, "weight_block_size '128'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128, 128]}, "weight_block_size [128, 128, 128]"),
    ],
)
def test_a_malformed_quantization_config_is_refused_naming_config_json_and_the_field(
    tmp_path, quantization_config, field
):
    c, result = _merge_with_quantization_config(tmp_path, quantization_config)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1, err
    assert f"{c.base / 'config.json'}: " in err[0] and field in err[0] and "internal error" not in err[0], err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_mxfp4_experts_dequantize_to_the_float_layout(tmp_path):
    """gpt-oss stores experts as MXFP4 blocks (E, out, in/32, 16); a float output stores (E, in, out)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 96, 64, generator=g, dtype=torch.float64)  # (E, out, in)
    blocks, scales = mxfp4_quantize(w)
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    dense = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    tensors = {f"{prefix}_blocks": blocks, f"{prefix}_scales": scales, "model.layers.0.self_attn.q_proj.weight": dense}
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn"]}
    base = write_model(tmp_path / "base", tensors, shards=1, config={"quantization_config": quantization})
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    lora = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
    }
    adapter = write_adapter(tmp_path / "adapter", lora, r=2, lora_alpha=2)
    run_merge(base, adapter, tmp_path / "out", dtype="bfloat16")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == [prefix, "model.layers.0.self_attn.q_proj.weight"]
    expected = mxfp4_dequantize(blocks, scales).transpose(1, 2)  # (E, in, out)
    assert out[prefix].shape == (4, 64, 96)
    assert torch.equal(out[prefix], expected.to(torch.bfloat16))
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert math.isclose(1.0, 1.0)


@pytest.mark.parametrize("fmt_key", ["ct:channel:bf16", "ct:block:f32", "ct:tensor:f32", "nvfp4-ct"])
def test_compressed_tensors_dequantizes_the_kept_output_as_the_reference_does(tmp_path, fmt_key):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    c = build_case(tmp_path, fmt_key)
    run_merge(c.base, c.adapter, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    state = loaded.state_dict()
    for module in c.modules:
        expected = c.fmt.dequantize(module, out)
        # compressed-c.tensors unpacks FP4 into bf16 and dequantizes there; FP8 it dequantizes exactly as written
        tolerance = 2.0**-8 * expected.abs() if c.fmt.bits == 4 else 0 * expected
        assert ((state[f"{module}.weight"].double() - expected).abs() <= tolerance).all(), module


def _codec_weight(codec, shape, scale_shape, scale_dtype, codes_dtype="F8_E4M3"):
    from shardmerge.safetensors_io import DTYPE_SIZES, TensorInfo

    def info(name, dtype, shp):
        return TensorInfo(name, dtype, tuple(shp), Path("mem"), 0, math.prod(shp) * DTYPE_SIZES[dtype])

    tensors = {
        "m.weight": info("m.weight", codes_dtype, shape),
        "m.weight_scale_inv": info("m.weight_scale_inv", scale_dtype, scale_shape),
    }
    return codec.weights(tensors)["m.weight"]


@pytest.mark.parametrize("scale_dtype", ["U8", "F8_E8M0"])
def test_ue8m0_scales_stored_as_bytes_or_e8m0_requantize_to_powers_of_two_in_tiles(scale_dtype):
    from helpers.quant import fp8_dequantize, fp8_quantize

    from shardmerge.formats.fp8 import BlockFP8

    codec = BlockFP8({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
    q = _codec_weight(codec, (320, 200), (3, 2), scale_dtype)
    x = torch.randn(320, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_codes, ref_scale = fp8_quantize(x, 128, 128, torch.float32, pow2=True)
    stored = torch.ones(3, 2, dtype=torch.float32)
    stored = stored.to(torch.uint8) if scale_dtype == "U8" else stored.to(torch.float8_e8m0fnu)
    codes = torch.cat([codec.requantize(q, x[r0 : r0 + 128].float(), [stored], r0, None) for r0 in (0, 128, 256)])
    assert torch.equal(codec.dequantize(q, codes, [stored], 0).double(), fp8_dequantize(ref_codes, ref_scale, 128, 128))
    decoded = torch.exp2(stored.double() - 127) if scale_dtype == "U8" else stored.double()
    assert torch.equal(decoded, ref_scale.double())


def test_fp8_codes_outside_the_config_grid_are_refused_naming_the_tensor():
    from shardmerge.formats.fp8 import BlockFP8

    codec = BlockFP8({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ShardmergeError, match="'m.weight_scale_inv'.*128x128 block grid"):
        _codec_weight(codec, (320, 200), (2, 2), "F32")


def test_mxfp4_codec_requantizes_expert_tiles_as_the_reference_does():
    from shardmerge.formats.fp4 import MXFP4
    from shardmerge.safetensors_io import TensorInfo

    codec = MXFP4({"quant_method": "mxfp4"})
    tensors = {
        "e.gate_up_proj_blocks": TensorInfo("e.gate_up_proj_blocks", "U8", (3, 96, 2, 16), Path("mem"), 0, 9216),
        "e.gate_up_proj_scales": TensorInfo("e.gate_up_proj_scales", "U8", (3, 96, 2), Path("mem"), 0, 576),
    }
    q = codec.weights(tensors)["e.gate_up_proj_blocks"]
    assert (q.name, q.shape) == ("e.gate_up_proj", (3, 64, 96))  # the float layout: (E, in, out)
    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scales = torch.zeros(3, 96, 2, dtype=torch.uint8)
    codes = torch.cat([codec.requantize(q, w[e : e + 1].reshape(1, -1).float(), [scales], e, None) for e in range(3)])
    ref_blocks, ref_scales = mxfp4_quantize(w.transpose(1, 2))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(
        codec.dequantize(q, codes, [scales], 0).double().reshape(3, 64, 96),
        mxfp4_dequantize(ref_blocks, ref_scales).transpose(1, 2),
    )


def _tiny_gpt_oss():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(gpt_oss_config(), dtype=torch.bfloat16)


def test_mxfp4_gpt_oss_dequantizes_as_transformers_does(tmp_path):
    """transformers dequantizes gpt-oss MXFP4 experts on a CPU; a bf16 output must hold the same experts, and
    load in plain transformers."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    quiet()
    experts = ("experts.gate_up_proj", "experts.down_proj")
    base = write_mxfp4_experts(tmp_path / "base", _tiny_gpt_oss(), experts, MXFP4_CONFIG["modules_to_not_convert"])
    reference = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).state_dict()
    adapter = make_lora(_tiny_gpt_oss(), tmp_path / "adapter")
    run_merge(base, adapter, tmp_path / "out", dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16).state_dict()
    experts = [n for n in loaded if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2
    for name in experts:
        assert torch.equal(loaded[name], reference[name]), name


def test_expert_lora_into_integer_experts_without_a_quantized_format_is_refused_naming_the_tensor(tmp_path):
    from peft import LoraConfig

    quiet()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    base = tmp_path / "base"
    _tiny_gpt_oss().save_pretrained(str(base))
    state = load_file(str(base / "model.safetensors"))
    state[name] = state[name].to(torch.int8)  # no quantization_config says what these integers mean
    write_model(base, state, shards=1, config=json.loads((base / "config.json").read_text()))
    lora = LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    make_adapter(_tiny_gpt_oss(), tmp_path / "adapter", lora)
    with pytest.raises(ShardmergeError, match=f"'{name}' is I8, neither a float tensor nor a weight of a quantized"):
        run_merge(base, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


_WHOLE_SCALES = {
    "ct:tensor:f32": {"weight_scale"},
    "nvfp4-modelopt": {"weight_scale_2"},
    "nvfp4-ct": {"weight_global_scale"},
}


@pytest.mark.parametrize("fmt_key", list(FORMATS))
def test_scales_on_the_row_blocks_travel_with_their_tiles_and_one_per_tensor_scales_are_held_whole(fmt_key):
    """Which scales a tile reads and rewrites with its own rows (so a tensor's scales are never held whole) and
    which the task holds whole (one value for the tensor)."""
    from shardmerge.formats import detect
    from shardmerge.safetensors_io import DTYPE_SIZES, TensorInfo

    fmt = FORMATS[fmt_key]
    stored = fmt.quantize("m", torch.randn(320, 256, dtype=torch.float64))
    dtypes = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}
    infos = {}
    for name, t in stored.items():
        dtype = dtypes[t.dtype]
        infos[name] = TensorInfo(name, dtype, tuple(t.shape), Path("mem"), 0, t.numel() * DTYPE_SIZES[dtype])
    codec = detect({"quantization_config": fmt.config}, Path("/nonexistent"))
    (q,) = codec.weights(infos).values()
    tiled = {s.name.rpartition(".")[2]: t for s, t in zip(q.scales, codec.tiled_scales(q))}
    whole = _WHOLE_SCALES.get(fmt_key, set())
    assert tiled == {name: name not in whole for name in tiled}, tiled


def test_mxfp4_scales_travel_with_their_experts():
    from shardmerge.formats.fp4 import MXFP4
    from shardmerge.safetensors_io import TensorInfo

    codec = MXFP4({"quant_method": "mxfp4"})
    tensors = {
        "e.down_proj_blocks": TensorInfo("e.down_proj_blocks", "U8", (3, 64, 3, 16), Path("mem"), 0, 9216),
        "e.down_proj_scales": TensorInfo("e.down_proj_scales", "U8", (3, 64, 3), Path("mem"), 0, 576),
    }
    assert codec.tiled_scales(codec.weights(tensors)["e.down_proj_blocks"]) == (True,)
