"""Expert LoRA (PEFT `target_parameters`) merged into quantized experts: per-expert FP8 checkpoints (block FP8 as
DeepSeek-V3 and Qwen3-MoE-FP8 ship them, compressed-tensors FP8) and gpt-oss's fused MXFP4 experts.

Each case is a tiny model built from a transformers config (Qwen3-MoE with hidden 256 and experts of 320, so
128-blocks matter and are ragged; gpt-oss), saved by transformers, then quantized by the tests' own float64
quantizers (tests/helpers/quant.py). The reference is PEFT's merge_and_unload() in float64 into a float64 model
holding the dequantized base, saved by transformers in the checkpoint's own layout; for `dtype: keep` it is
requantized with the tests' own requantizer, for `dtype: bfloat16` PEFT merges into a bf16 model instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.adapters import lora_pair, make_adapter, write_adapter
from helpers.models import random_model, tensor_bytes, write_model
from helpers.plans import run_cli, write_plan
from helpers.quant import (
    MXFP4_CONFIG,
    Format,
    formats,
    gpt_oss_config,
    mxfp4_dequantize,
    mxfp4_quantize,
    qwen3_moe_config,
)
from helpers.reference import input_ids, peft_merged
from safetensors.torch import load_file

from shardmerge import merge

FORMATS = formats()
TARGET_MODULES = ["q_proj", "v_proj"]
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
_FP8_LINEAR = re.compile(r".*\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
_MXFP4_EXPERTS = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Quantizer:
    """How a case's checkpoint is quantized, and the tests' own float64 reading and requantizing of it."""

    key: str  # a quant_models format key, or "mxfp4"

    @property
    def config(self) -> dict:
        return MXFP4_CONFIG if self.key == "mxfp4" else FORMATS[self.key].config

    @property
    def fmt(self) -> Format:
        return FORMATS[self.key]

    def quantize(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The stored tensors for float tensor `name`, or None where it stays float."""
        if self.key == "mxfp4":
            if not _MXFP4_EXPERTS.match(name):
                return None
            blocks, scales = mxfp4_quantize(w.double().transpose(1, 2))  # stored (E, out, in)
            return {f"{name}_blocks": blocks, f"{name}_scales": scales}
        if not _FP8_LINEAR.match(name):
            return None
        return self.fmt.quantize(name.removesuffix(".weight"), w.double())

    def dequantize(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float64 value of float-checkpoint tensor `name` in a checkpoint whose tensors are `tensors`."""
        if self.key == "mxfp4" and f"{name}_blocks" in tensors:
            return mxfp4_dequantize(tensors[f"{name}_blocks"], tensors[f"{name}_scales"]).transpose(1, 2)
        if self.key != "mxfp4" and tensors[name].dtype == torch.float8_e4m3fn:
            return self.fmt.dequantize(name.removesuffix(".weight"), tensors)
        return tensors[name].double()

    def requantize(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The tests' own requantization of float64 tensor `name`, dequantized again (a bf16 tensor: rounded)."""
        stored = self.quantize(name, w)
        return w.to(torch.bfloat16).double() if stored is None else self.dequantize(name, stored)


CASES = {
    "fp8:f32": qwen3_moe_config,  # DeepSeek-V3: F32 block scales
    "fp8:bf16": qwen3_moe_config,  # Qwen3-MoE-FP8: BF16 block scales
    "ct:block:f32": qwen3_moe_config,  # compressed-tensors block
    "ct:channel:bf16": qwen3_moe_config,  # compressed-tensors per channel
    "mxfp4": gpt_oss_config,
}


@dataclass
class Built:
    q: Quantizer
    config: object
    base: Path
    tensors: dict[str, torch.Tensor]  # the quantized base checkpoint's
    dequantized: dict[str, torch.Tensor]  # float64, by float-checkpoint name
    exact: dict[str, torch.Tensor]  # PEFT's float64 merge, by float-checkpoint name, only what it changes
    adapter: Path
    root: Path
    outputs: dict = None  # dtype -> (output dir, report)

    def output(self, dtype: str):
        if dtype not in self.outputs:
            out = self.root / f"out-{dtype}"
            report = merge(
                {"base": str(self.base), "adapters": [{"path": str(self.adapter)}], "output": str(out), "dtype": dtype}
            )
            self.outputs[dtype] = (out, report)
        return self.outputs[dtype]


def build_base(root: Path, q: Quantizer, config) -> tuple[Path, dict, dict]:
    """The model saved by transformers (per-expert tensors for Qwen3-MoE, fused for gpt-oss) with its linear
    weights in `q`'s format; also the dequantized float64 tensors, written as a float64 checkpoint."""
    random_model(config).to(torch.bfloat16).save_pretrained(root / "float")
    saved, tensors = json.loads((root / "float" / "config.json").read_text()), {}
    for name, w in load_file(str(root / "float" / "model.safetensors")).items():
        tensors.update(q.quantize(name, w) or {name: w})
    base = write_model(root / "base", tensors, 1, {**saved, "quantization_config": q.config})
    names = load_file(str(root / "float" / "model.safetensors")).keys()
    dequantized = {name: q.dequantize(name, tensors).contiguous() for name in names}
    write_model(root / "deq64", dequantized, 1, {**saved, "dtype": "float64"})
    return base, tensors, dequantized


def build_adapter(directory: Path, config, std: float) -> Path:
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS)
    return make_adapter(random_model(config), directory, lora, std=std)


def exact_merge(root: Path, adapter: Path, dequantized: dict) -> dict[str, torch.Tensor]:
    """PEFT's float64 merge into the dequantized base, saved by transformers in the checkpoint's layout (per
    expert for Qwen3-MoE): only the tensors it changes."""
    peft_merged(root / "deq64", [adapter], dtype=torch.float64).save_pretrained(root / "exact64")
    merged = load_file(str(root / "exact64" / "model.safetensors"))
    assert merged.keys() == dequantized.keys()
    return {name: w for name, w in merged.items() if not torch.equal(w, dequantized[name])}


_BUILT: dict[str, Built] = {}


def built_case(key: str, tmp_path_factory, config=None) -> Built:
    case_id = key if config is None else f"{key}-{id(config)}"
    if case_id not in _BUILT:
        q, config = Quantizer(key), config or CASES[key]()
        root = tmp_path_factory.mktemp(key.replace(":", "-"))
        base, tensors, dequantized = build_base(root, q, config)
        adapter = build_adapter(root / "adapter", config, std=0.03)
        exact = exact_merge(root, adapter, dequantized)
        _BUILT[case_id] = Built(q, config, base, tensors, dequantized, exact, adapter, root, {})
    return _BUILT[case_id]


@pytest.fixture
def built(request, tmp_path_factory) -> Built:
    return built_case(request.param, tmp_path_factory)


per_case = pytest.mark.parametrize("built", list(CASES), indirect=True)


def _experts(names) -> list[str]:
    return sorted(n for n in names if ".experts." in n)


@per_case
def test_the_reference_changes_every_expert_tensor_of_the_checkpoint(built: Built):
    """The cases are real: PEFT's merge moves every expert tensor, per expert (Qwen3-MoE) or fused (gpt-oss)."""
    experts = [n for n in _experts(built.dequantized) if not n.endswith("_bias")]
    assert len(experts) == (12 if built.q.key != "mxfp4" else 2)
    assert set(experts) <= set(built.exact)


@per_case
def test_keep_requantizes_merged_experts_no_worse_than_the_reference(built: Built):
    """Every merged tensor (experts and attention) dequantizes no further from the exact float64 merge than the
    tests' own requantization of that merge (1.5x); the tensors are the base's names, dtypes and shapes."""
    out_dir, _ = built.output("keep")
    out = load_file(str(out_dir / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in built.tensors.items()}
    for name, exact in built.exact.items():
        reference_error = (built.q.requantize(name, exact) - exact).norm()
        error = (built.q.dequantize(name, out) - exact).norm()
        assert error <= 1.5 * reference_error + 1e-12, (name, error.item(), reference_error.item())
        if built.q.key != "mxfp4":  # FP8 keeps most of the delta; FP4 rounds most of it away
            assert error < 0.5 * (built.dequantized[name] - exact).norm(), name


@per_case
def test_keep_leaves_untouched_tensors_scales_and_config_byte_identical(built: Built):
    out_dir, _ = built.output("keep")
    out = load_file(str(out_dir / "model.safetensors"))
    merged = {name for base in built.exact for name in built.q.quantize(base, built.exact[base]) or [base]}
    untouched = sorted(set(built.tensors) - merged)
    assert any(n.endswith(("scale", "_scales", "scale_inv")) for n in untouched) or built.q.key == "mxfp4"
    assert any(n.endswith("_bias") for n in untouched) or built.q.key != "mxfp4"  # gpt-oss expert biases
    assert [n for n in untouched if tensor_bytes(out[n]) != tensor_bytes(built.tensors[n])] == []
    assert (out_dir / "config.json").read_bytes() == (built.base / "config.json").read_bytes()


@per_case
def test_keep_reports_the_delta_survival_of_expert_tensors(built: Built):
    """Survival ||deq(out) - deq(base)|| / ||exact - deq(base)|| per merged expert tensor, under the stored
    (codes) name."""
    out_dir, report = built.output("keep")
    out = load_file(str(out_dir / "model.safetensors"))
    for name in _experts(built.exact):
        stored = f"{name}_blocks" if built.q.key == "mxfp4" else name
        base_w = built.dequantized[name]
        direct = (built.q.dequantize(name, out) - base_w).norm() / (built.exact[name] - base_w).norm()
        assert report.delta_survival[stored] == pytest.approx(direct.item(), rel=1e-3), name


@per_case
def test_verify_with_the_plan_accepts_the_kept_output(built: Built, tmp_path):
    from shardmerge.verify import _recompute

    out_dir, _ = built.output("keep")
    plan = write_plan(tmp_path / "plan.yaml", base=built.base, adapters=[{"path": built.adapter}], output="x")
    assert _recompute(out_dir, str(plan), samples=100, max_memory=None) == []


def _bf16_tolerance(exact: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """|shardmerge - PEFT in bf16|: shardmerge rounds the float32 merge of the dequantized base once; PEFT holds
    the base rounded to bf16 and adds a delta it rounded to bf16, one ulp of the magnitude per rounding."""
    eps = torch.finfo(torch.bfloat16).eps
    return eps * (1.5 * exact.abs() + 3 * mag) + 1e-30


@pytest.mark.parametrize("built", ["fp8:f32", "ct:channel:bf16", "mxfp4"], indirect=True)
def test_bfloat16_output_loads_in_plain_transformers_and_matches_peft(built: Built):
    from transformers import AutoModelForCausalLM

    out_dir, _ = built.output("bfloat16")
    saved = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "bfloat16"
    out = load_file(str(out_dir / "model.safetensors"))
    assert sorted(out) == sorted(built.dequantized) and all(t.dtype == torch.bfloat16 for t in out.values())
    bf16 = built.root / "deq-bf16"
    if not bf16.exists():
        config = json.loads((built.root / "deq64" / "config.json").read_text()) | {"dtype": "bfloat16"}
        write_model(bf16, {k: v.to(torch.bfloat16) for k, v in built.dequantized.items()}, 1, config)
    peft = peft_merged(bf16, [built.adapter], dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.bfloat16).eval()
    exact64 = peft_merged(built.root / "deq64", [built.adapter], dtype=torch.float64).state_dict()
    base64 = AutoModelForCausalLM.from_pretrained(str(built.root / "deq64"), dtype=torch.float64).state_dict()
    for name, p in loaded.state_dict().items():
        mag = base64[name].abs() + (exact64[name] - base64[name]).abs()
        err = (p.double() - peft.state_dict()[name].double()).abs()
        assert (err <= _bf16_tolerance(exact64[name], mag)).all(), (name, err.max().item())
    with torch.no_grad():
        logits, want = loaded(input_ids()).logits.float(), peft(input_ids()).logits.float()
        base_logits = AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16)(input_ids()).logits
    atol = 0.02 * want.abs().max().item()
    assert (want - base_logits.float()).abs().max() > 3 * atol, "the adapter hardly moves the logits"
    assert (logits - want).abs().max() <= atol


def test_transformers_dequantizes_kept_mxfp4_experts_as_the_reference_does(tmp_path_factory):
    """transformers dequantizes gpt-oss MXFP4 experts on a CPU (Mxfp4Config(dequantize=True)): the kept output
    loads through it, equal to the tests' own dequantization of what was written, and as close to the exact
    merge as requantizing that merge is."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    b = built_case("mxfp4", tmp_path_factory)
    out_dir, _ = b.output("keep")
    out = load_file(str(out_dir / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(
        str(out_dir), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).state_dict()
    for name, exact in b.exact.items():
        if ".experts." not in name:
            continue
        assert torch.equal(loaded[name].double(), b.q.dequantize(name, out)), name
        reference_error = (b.q.requantize(name, exact) - exact).norm()
        assert (loaded[name].double() - exact).norm() <= 1.5 * reference_error, name


def test_transformers_dequantizes_kept_fp8_experts_as_the_reference_does(tmp_path_factory):
    """transformers' FineGrainedFP8 dequantizes per-expert FP8 on a CPU, folding each expert's weight and scales
    before fusing them; its grid must divide the weights, so experts of 384 here (no ragged block)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    b = built_case("fp8:bf16", tmp_path_factory, config=qwen3_moe_config(384))
    out_dir, _ = b.output("keep")
    out = load_file(str(out_dir / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(
        str(out_dir), quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    ).state_dict()
    prefix = "model.layers.0.mlp.experts"
    for e in range(b.config.num_experts):  # transformers fuses experts as gate_up[e] = [gate_e; up_e]
        gate, up, down = (
            b.q.dequantize(f"{prefix}.{e}.{p}.weight", out) for p in ("gate_proj", "up_proj", "down_proj")
        )
        fused = {"gate_up_proj": torch.cat([gate, up]), "down_proj": down}
        for param, expected in fused.items():
            got = loaded[f"{prefix}.{param}"][e].double()
            assert torch.allclose(got, expected, rtol=2**-20, atol=0), (param, e)
    for name, exact in b.exact.items():
        reference_error = (b.q.requantize(name, exact) - exact).norm()
        assert (b.q.dequantize(name, out) - exact).norm() <= 1.5 * reference_error, name


@pytest.mark.parametrize("built", ["fp8:bf16", "mxfp4"], indirect=True)
def test_experts_merged_in_many_tiles_hold_whole_blocks_and_give_the_same_bytes(built: Built, monkeypatch, tmp_path):
    """A small tile budget cuts expert tensors into tiles of whole scale blocks (FP8: 128 rows; MXFP4, whose
    scales run along the stored transpose: whole experts, d1 rows each), and the output is byte for byte the
    one merged in whole-tensor tiles."""
    import shardmerge.runner
    from shardmerge.config import load_plan
    from shardmerge.planner import build_plan

    budget = 700_000 if built.q.key == "mxfp4" else 2_000_000  # room for a few blocks of the largest tensor
    plan = write_plan(
        tmp_path / "plan.yaml", base=built.base, adapters=[{"path": built.adapter}], output=tmp_path / "o"
    )
    merge_plan = build_plan(load_plan(str(plan)), tmp_path, "cpu", budget)
    tasks = [t for s in merge_plan.shards for t in s.tasks if ".experts." in t.name and t.terms]
    d1 = {t.name: t.source.shape[1] for t in tasks}  # MXFP4: the logical (E, d1, d2)
    for t in tasks:
        assert t.row_unit == (d1[t.name] if built.q.key == "mxfp4" else 128), t.name
        assert t.rows_per_tile % t.row_unit == 0 and t.chunk_rows % t.row_unit == 0, t.name
    assert any(t.rows_per_tile < t.rows for t in tasks), "the budget leaves every expert tensor in one tile"
    monkeypatch.setattr(shardmerge.runner, "tile_budget", lambda plan, device: budget)
    merge(str(plan))
    whole, _ = built.output("keep")
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def write_gate_up_adapter(directory: Path, a: torch.Tensor, b: torch.Tensor, r: int) -> Path:
    """A PEFT 0.21.2 adapter on layer 0's experts.gate_up_proj alone (one ParamWrapper), scaling 2, as saved."""
    prefix = "base_model.model.model.layers.0.mlp.experts"
    return write_adapter(
        directory,
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
        r=r,
        lora_alpha=2 * r,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj"],
        peft_version="0.21.2",
    )


@pytest.mark.slow
def test_a_quantized_expert_tensor_larger_than_max_memory_merges_within_it(tmp_path):
    """Per-expert block-FP8 tensors of 24 MB (ragged columns) merge within 22 MiB, against the float64 merge
    per PEFT's ParamWrapper semantics (ΔP[e] = B_e @ A_e, A_e rows e*r.., B_e columns k*E + e)."""
    fmt = FORMATS["fp8:bf16"]
    experts, inter, hidden, r = 2, 46080, 520, 2
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(experts):
        for leaf in ("gate_proj", "up_proj"):
            w = torch.randn(inter, hidden, generator=g, dtype=torch.float64) * 0.05
            tensors.update(fmt.quantize(f"model.layers.0.mlp.experts.{e}.{leaf}", w))
    config = qwen3_moe_config().to_dict() | {"hidden_size": hidden, "moe_intermediate_size": inter}
    base = write_model(
        tmp_path / "base", tensors, 1, config | {"num_experts": experts, "quantization_config": fmt.config}
    )
    a = torch.randn(r * experts, hidden, generator=g) * 0.05
    b = torch.randn(2 * inter, r * experts, generator=g) * 0.05
    adapter = write_gate_up_adapter(tmp_path / "adapter", a, b, r)
    budget = 22 * 2**20  # 16 MiB of fixed runtime overhead, 6 MiB for buffers
    report = merge(
        {"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(tmp_path / "o"), "max_memory": budget}
    )
    assert tensors["model.layers.0.mlp.experts.0.gate_proj.weight"].numel() > budget
    assert 0 < report.peak_budget_bytes <= budget
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    for e in range(experts):
        delta = 2.0 * b.double()[:, torch.arange(r) * experts + e] @ a.double()[e * r : e * r + r]
        for leaf, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
            module = f"model.layers.0.mlp.experts.{e}.{leaf}"
            exact = fmt.dequantize(module, tensors) + delta[rows]
            reference_error = (fmt.requantize(module, exact) - exact).norm()
            assert (fmt.dequantize(module, out) - exact).norm() <= 1.5 * reference_error, module


@pytest.mark.slow
def test_a_fused_mxfp4_expert_stack_larger_than_max_memory_merges_within_it(tmp_path):
    """gpt-oss's fused gate_up_proj in MXFP4, 32 MiB of codes, merges within 30 MiB: tiles of whole experts, each
    with its own rows of the scales; sampled experts against the float64 merge per PEFT's ParamWrapper semantics
    (gpt-oss is_transposed, PEFT 0.21.2 does not swap: ΔP[e] = A_eᵀ @ B_eᵀ, A_e rows e*r.., B_e columns k*E + e)."""
    experts, hidden, inter, r = 512, 256, 256, 1
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {  # random codes, scales around 2^-5: stored (E, 2I, H/32, 16) and (E, 2I, H/32)
        f"{name}_blocks": torch.randint(0, 256, (experts, 2 * inter, hidden // 32, 16), generator=g, dtype=torch.uint8),
        f"{name}_scales": torch.randint(120, 124, (experts, 2 * inter, hidden // 32), generator=g, dtype=torch.uint8),
    }
    config = gpt_oss_config().to_dict() | {"hidden_size": hidden, "intermediate_size": inter}
    config |= {"num_local_experts": experts, "quantization_config": MXFP4_CONFIG}
    base = write_model(tmp_path / "base", tensors, 1, config)
    a = torch.randn(r * experts, hidden, generator=g) * 0.1
    b = torch.randn(2 * inter, r * experts, generator=g) * 0.1
    adapter = write_gate_up_adapter(tmp_path / "adapter", a, b, r)
    budget = 30 * 2**20
    report = merge(
        {"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(tmp_path / "o"), "max_memory": budget}
    )
    assert tensors[f"{name}_blocks"].numel() > budget and 0 < report.peak_budget_bytes <= budget
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    for e in (0, 1, experts // 2, experts - 1):
        exact = mxfp4_dequantize(tensors[f"{name}_blocks"][e], tensors[f"{name}_scales"][e]).T  # (H, 2I)
        exact += 2.0 * a.double()[e * r : e * r + r].T @ b.double()[:, torch.arange(r) * experts + e].T
        reference = mxfp4_dequantize(*mxfp4_quantize(exact.T)).T
        got = mxfp4_dequantize(out[f"{name}_blocks"][e], out[f"{name}_scales"][e]).T
        assert (got - exact).norm() <= 1.5 * (reference - exact).norm(), e


def test_fused_fp8_experts_are_refused_when_dequantizing_rather_than_written_as_raw_codes(tmp_path):
    """transformers' FP8Experts layout (as save_original_format=False and some Hub checkpoints store it): fused
    `experts.gate_up_proj` F8 (E, 2I, H) with `gate_up_proj_scale_inv` (E, ., .). No codec decodes it, so a
    bfloat16 output would hold its codes cast as values (off by the scales); one line names it instead."""
    from helpers.quant import fp8_quantize

    model = random_model(qwen3_moe_config(moe_intermediate=128))
    state = {n: p.detach().to(torch.bfloat16) for n, p in model.state_dict().items()}  # module (fused) names
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    pairs = [fp8_quantize(w, 128, 128, torch.float32) for w in state[fused].double()]
    state[fused], state[fused + "_scale_inv"] = torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])
    config = {**model.config.to_dict(), "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    base = write_model(tmp_path / "base", state, shards=2, config=config)
    adapter = write_adapter(tmp_path / "adapter", lora_pair("model.layers.0.self_attn.q_proj", 256, 256))
    plan = write_plan(
        tmp_path / "plan.yaml", base=base, adapters=[{"path": adapter}], output=tmp_path / "o", dtype="bfloat16"
    )
    result = run_cli(plan, "--quiet")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1 and "Traceback" not in result.stderr, err
    assert f"{fused!r} [4, 256, 256] F8_E4M3" in err[0] and "dtype: keep" in err[0], err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
