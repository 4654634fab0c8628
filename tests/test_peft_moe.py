"""LoRA on expert parameters (PEFT `target_parameters`) merged by shardmerge equals PEFT's merge_and_unload(),
at model level: the output is loaded with transformers (which converts per-expert checkpoints to its fused
modules) and every parameter and the logits are compared with PEFT's merged model.

Each case is a tiny random MoE model built from a config (Qwen3-MoE, Mixtral, gpt-oss, Llama 4 text), saved in
several shards the way transformers saves it (per expert for Qwen3-MoE and Mixtral, fused for gpt-oss and
Llama 4), with an adapter on attention projections and on both expert parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter, write_adapter
from helpers.models import INDEX_NAME, add_tensor, build_base, load_tensors, quiet, shard_files, tensor_bytes
from helpers.moe import EXPERT_PARAMS, build_moe_base, make_moe_adapter, moe_config
from helpers.plans import run_cli, write_plan
from helpers.reference import assert_same_model, input_ids, peft_merged, peft_model

import shardmerge


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    lora: dict = field(default_factory=dict)  # extra LoraConfig keywords
    weights: tuple[float, ...] = (1.0,)  # one adapter per plan weight
    max_shard_size: str = "20KB"
    max_memory: str = "64MiB"
    split_experts: bool = False  # the base puts one layer's experts in several shards


CASES = [
    Case("qwen3-moe-experts-split-over-shards", "qwen3_moe", max_shard_size="8KB", split_experts=True),
    Case(
        "qwen3-moe-rank-pattern",
        "qwen3_moe",
        {"rank_pattern": {"layers.1.mlp.experts.gate_up_proj": 6}, "alpha_pattern": {"down_proj": 3}},
    ),
    Case("mixtral-two-adapters", "mixtral", weights=(1.0, -0.5)),
    Case("gpt-oss", "gpt_oss"),
    Case("qwen3.5-moe-text-per-expert", "qwen3_5_moe_text"),
    Case(  # the model has no gate_up_proj: PEFT wraps the two parameters it has
        "nemotron-h-up-and-down-experts",
        "nemotron_h",
        {"target_parameters": ["experts.gate_up_proj", "experts.up_proj", "experts.down_proj"]},
    ),
    Case("llama4-rslora", "llama4", {"use_rslora": True, "lora_alpha": 4}),
]
CASES_BY_ID = {c.id: c for c in CASES}


@dataclass
class Reference:
    params: dict[str, torch.Tensor]  # PEFT's merged model, module names
    exact: dict[str, torch.Tensor]  # float64 merge of every parameter an adapter changes
    mag: dict[str, torch.Tensor]  # |W| + sum |s| |B| |A|: bounds every value PEFT rounds
    logits: torch.Tensor
    base_logits: torch.Tensor


def _param_delta64(module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ParamWrapper delta in float64 (its einsum, its orientation), and its magnitude bound."""
    experts = module.num_experts
    a = module.lora_A[name].weight.detach().double().reshape(experts, -1, module.lora_A[name].weight.shape[1])
    b = module.lora_B[name].weight.detach().double()
    b = b.reshape(b.shape[0], -1, experts)
    spec = "o r e, e r i -> e o i" if module._did_swap_in_out_features else "o r e, e r i -> e i o"
    s = float(module.scaling[name])
    return torch.einsum(spec, b, a) * s, torch.einsum(spec, b.abs(), a.abs()) * abs(s)


def peft_moe_reference(base: Path, adapters: list[Path], weights: tuple[float, ...]) -> Reference:
    quiet()
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear, ParamWrapper
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        base_logits = base_model(input_ids()).logits.float()
    pm = peft_model(base, adapters, dtype=torch.bfloat16)
    names = list(pm.peft_config)
    exact, mag = {}, {}
    for path, module in pm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        owner = path.removeprefix("base_model.model.").replace(".base_layer", "")
        key = f"{owner}.{module.parameter_name}" if isinstance(module, ParamWrapper) else f"{owner}.weight"
        attribute = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
        param = getattr(module.get_base_layer(), attribute)
        exact.setdefault(key, param.detach().double().clone())
        mag.setdefault(key, param.detach().double().abs())
        for name, w in zip(names, weights):
            module.scaling[name] *= w  # the plan weight
            if isinstance(module, ParamWrapper):
                delta, bound = _param_delta64(module, name)
            else:
                assert isinstance(module, Linear)
                a, b = module.lora_A[name].weight.detach().double(), module.lora_B[name].weight.detach().double()
                s = float(module.scaling[name])
                delta, bound = (b @ a) * s, (b.abs() @ a.abs()) * abs(s)
            exact[key] += delta
            mag[key] += bound
    merged = pm.merge_and_unload().eval()
    with torch.no_grad():
        logits = merged(input_ids()).logits.float()
    params = {n: p.detach().clone() for n, p in merged.named_parameters()}
    return Reference(params, exact, mag, logits, base_logits)


@dataclass
class Built:
    case: Case
    base: Path
    adapters: list[Path]
    output: Path
    ref: Reference
    report: object


_BUILT: dict[str, Built] = {}


@pytest.fixture
def built(request, tmp_path_factory) -> Built:
    case = CASES_BY_ID[request.param]
    if case.id not in _BUILT:
        root = tmp_path_factory.mktemp(case.id)
        base = build_moe_base(root / "base", case.family, case.max_shard_size)
        adapters = [
            make_moe_adapter(base, root / f"adapter{i}", seed=1 + i, **case.lora) for i in range(len(case.weights))
        ]
        ref = peft_moe_reference(base, adapters, case.weights)
        report = shardmerge.merge(
            {
                "base": str(base),
                "output": str(root / "merged"),
                "device": "cpu",
                "max_memory": case.max_memory,
                "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, case.weights)],
            }
        )
        _BUILT[case.id] = Built(case, base, adapters, root / "merged", ref, report)
    return _BUILT[case.id]


def per_case(cases=CASES):
    return pytest.mark.parametrize("built", [c.id for c in cases], indirect=True)


def _load_output(built: Built) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built.output, dtype=torch.bfloat16)
    return {n: p.detach() for n, p in model.named_parameters()}


def _tolerance(value: torch.Tensor, mag: torch.Tensor, steps: int) -> torch.Tensor:
    """|shardmerge - PEFT| from rounding alone: shardmerge rounds once (half an ulp of W'); PEFT rounds each
    adapter's delta to bf16 and adds in bf16, one ulp of the magnitude per step."""
    eps = torch.finfo(torch.bfloat16).eps
    return eps * (1.5 * value.abs() + steps * 2 * mag) + 1e-30


@per_case()
def test_output_keeps_the_base_shards_names_and_layout(built: Built):
    assert shard_files(built.output) == shard_files(built.base), "tensor names or shard files differ from the base"
    out, base = load_tensors(built.output), load_tensors(built.base)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}


@per_case()
def test_every_parameter_matches_peft_merge_and_unload(built: Built):
    got, ref = _load_output(built), built.ref
    assert set(got) == set(ref.params)
    steps = len(built.case.weights)
    failures = []
    for name in sorted(ref.params):
        if name not in ref.exact:
            assert torch.equal(got[name], ref.params[name]), f"{name} changed though no adapter touches it"
            continue
        err = (got[name].double() - ref.params[name].double()).abs()
        tol = _tolerance(ref.exact[name], ref.mag[name], steps)
        if (err > tol).any():
            failures.append(f"{name}: max|shardmerge - PEFT| = {err.max().item():.3g}")
    assert not failures, "\n".join(failures)
    assert any("experts" in n for n in ref.exact), "the case changes no expert parameter"


@per_case()
def test_expert_deltas_move_far_more_than_the_tolerance(built: Built):
    """The parameter check has teeth: every expert parameter moves by far more than rounding allows."""
    from transformers import AutoModelForCausalLM

    base = {
        n: p.detach().double()
        for n, p in AutoModelForCausalLM.from_pretrained(built.base, dtype=torch.bfloat16).named_parameters()
    }
    ref = built.ref
    for name in (n for n in ref.exact if "experts" in n):
        moved = (ref.exact[name] - base[name]).abs()
        tol = _tolerance(ref.exact[name], ref.mag[name], len(built.case.weights))
        assert (moved > 4 * tol).double().mean() > 0.5, f"{name}: the delta is too small to test"


@per_case()
def test_error_vs_float64_is_no_larger_than_peft(built: Built):
    got, ref = _load_output(built), built.ref
    worse = []
    for name, exact in ref.exact.items():
        err_sm = (got[name].double() - exact).abs().max().item()
        err_peft = (ref.params[name].double() - exact).abs().max().item()
        if err_sm > err_peft + 8 * torch.finfo(torch.float32).eps * ref.mag[name].max().item():
            worse.append(f"{name}: shardmerge {err_sm:.3g} > PEFT {err_peft:.3g}")
    assert not worse, "\n".join(worse)


@per_case()
def test_logits_match_peft(built: Built):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built.output, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids()).logits.float()
    want, base = built.ref.logits, built.ref.base_logits
    atol = 6e-2 * max(want.abs().max().item(), 1.0)
    assert (want - base).abs().max() > 5 * atol, "the adapters hardly move the logits; the check would be vacuous"
    assert (logits - want).abs().max() <= atol


@per_case()
def test_tensors_no_adapter_touches_are_byte_identical(built: Built):
    out, base = load_tensors(built.output), load_tensors(built.base)
    untouched = [k for k in base if "experts" not in k and "q_proj" not in k and "v_proj" not in k]
    assert untouched
    assert [k for k in untouched if tensor_bytes(out[k]) != tensor_bytes(base[k])] == []
    changed = [k for k in base if "experts" in k and "bias" not in k and tensor_bytes(out[k]) != tensor_bytes(base[k])]
    assert changed, "no expert tensor changed"


@per_case([c for c in CASES if c.split_experts])
def test_a_layer_whose_experts_span_two_shards_is_a_real_case(built: Built):
    """Each expert's slice needs only its own (A_e, B_e), so experts of one layer may lie in any shards; this
    case's base really splits them (and the tests above pass on it)."""
    files = shard_files(built.base)
    layer0 = {f for k, f in files.items() if k.startswith("model.layers.0.mlp.experts.")}
    assert len(layer0) >= 2, f"layer 0's experts lie in {len(layer0)} shard(s); lower max_shard_size"


# --------------------------------------------------------------------------------------------------
# provenance: square experts
# --------------------------------------------------------------------------------------------------


def _gpt_oss_without_version(tmp_path) -> tuple[Path, Path]:
    base = build_moe_base(tmp_path / "base", "gpt_oss")
    adapter = make_moe_adapter(base, tmp_path / "adapter", seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["peft_version"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def test_square_experts_without_peft_version_are_refused_as_ambiguous(tmp_path):
    base, adapter = _gpt_oss_without_version(tmp_path)
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[adapter], output=tmp_path / "out", device="cpu")
    result = run_cli(plan)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "layout is ambiguous" in err[0] and "down_proj" in err[0] and "peft_version" in err[0]
    assert not (tmp_path / "out" / INDEX_NAME).exists()


def test_peft_version_in_the_plan_resolves_square_experts(tmp_path):
    base, adapter = _gpt_oss_without_version(tmp_path)
    with_plan = shardmerge.merge(
        {
            "base": str(base),
            "adapters": [{"path": str(adapter), "peft_version": "0.21.2"}],
            "output": str(tmp_path / "a"),
            "device": "cpu",
        }
    )
    assert with_plan.tensors_merged > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "peft_version" not in config, "the user's adapter_config.json was modified"
    ref = peft_moe_reference(base, [adapter], (1.0,))  # PEFT 0.21.2 itself, the version named in the plan
    got = _load_output(Built(CASES_BY_ID["gpt-oss"], base, [adapter], tmp_path / "a", ref, with_plan))
    name = "model.layers.0.mlp.experts.down_proj"
    error = (got[name].double() - ref.params[name].double()).abs()
    assert (error <= _tolerance(ref.exact[name], ref.mag[name], 1)).all()


# --------------------------------------------------------------------------------------------------
# transformers-4 era adapters: one LoRA per expert projection
# --------------------------------------------------------------------------------------------------


def test_per_expert_adapter_of_the_transformers_4_era_merges_into_per_expert_tensors(tmp_path):
    base = build_moe_base(tmp_path / "base", "qwen3_moe")
    stored = load_tensors(base)
    g = torch.Generator().manual_seed(5)
    lora, exact = {}, {}
    for name, w in stored.items():
        if ".mlp.experts." in name:
            module = name.removesuffix(".weight")
            a, b = torch.randn(4, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 4, generator=g) * 0.2
            lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"] = a, b
            exact[name] = w.double() + 2.0 * (b.double() @ a.double())
    adapter = write_adapter(
        tmp_path / "adapter", lora, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    shardmerge.merge({"base": str(base), "adapters": [str(adapter)], "output": str(tmp_path / "out"), "device": "cpu"})
    out = load_tensors(tmp_path / "out")
    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    for name, want in exact.items():
        assert ((out[name].double() - want).abs() <= half_ulp * want.abs() + 1e-30).all(), name
    assert all(tensor_bytes(out[k]) == tensor_bytes(v) for k, v in stored.items() if k not in exact)


def test_unsloth_grouped_by_expert_lora_b_gives_the_same_merge(tmp_path):
    """The same factors with lora_B's columns grouped by expert (e*r + k) and `lora_B_layout` saying so merge
    to the same bytes as PEFT's rank-major packing (k*E + e)."""
    from safetensors.torch import load_file

    base = build_moe_base(tmp_path / "base", "mixtral")
    peft_adapter = make_moe_adapter(base, tmp_path / "peft", seed=7)
    tensors = load_file(str(peft_adapter / "adapter_model.safetensors"))
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    experts = 4
    for key, t in tensors.items():
        if ".experts." in key and "lora_B" in key:  # columns k*E + e -> e*r + k
            tensors[key] = t.reshape(t.shape[0], config["r"], experts).transpose(1, 2).reshape(t.shape).contiguous()
    unsloth = write_adapter(tmp_path / "unsloth", tensors, **config, lora_B_layout="grouped_by_expert")
    for name, adapter in (("a", peft_adapter), ("b", unsloth)):
        shardmerge.merge(
            {"base": str(base), "adapters": [str(adapter)], "output": str(tmp_path / name), "device": "cpu"}
        )
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert all(tensor_bytes(a[k]) == tensor_bytes(b[k]) for k in a)
    assert any(tensor_bytes(a[k]) != tensor_bytes(v) for k, v in load_tensors(base).items() if ".experts." in k)


@per_case([CASES_BY_ID["gpt-oss"], CASES_BY_ID["qwen3-moe-experts-split-over-shards"]])
def test_verify_recomputes_expert_tensors_from_the_inputs(built: Built, tmp_path):

    plan = write_plan(
        tmp_path / "plan.yaml",
        base=built.base,
        output=built.output,
        device="cpu",
        max_memory=built.case.max_memory,
        adapters=[{"path": a, "weight": w} for a, w in zip(built.adapters, built.case.weights)],
    )
    assert run_cli("verify", built.output, "--plan", plan, "--samples", "1000").returncode == 0


@per_case([c for c in CASES if c.split_experts])
def test_each_adapter_tensor_is_read_once_not_once_per_expert(built: Built):
    """Per-expert tensors each need their expert's columns of lora_B, strided over all of it: lora_B is kept
    loaded across them, so a merge reads no more than the base's and the adapters' files once (re-reading
    lora_B for each of the 4 experts would exceed that by ~17 KB here)."""
    files = list(built.base.glob("*.safetensors")) + [a / "adapter_model.safetensors" for a in built.adapters]
    assert built.report.bytes_read <= sum(f.stat().st_size for f in files)


def test_a_vlm_whose_text_model_stores_experts_one_by_one_merges_like_peft(tmp_path):
    """Qwen3.5-MoE (a VLM): transformers converts its language model by the text config's model type
    (qwen3_5_moe_text, per-expert rules); the top-level type has none."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText

    config = moe_config("qwen3_5_moe")
    base = build_base(tmp_path / "base", config, torch.float32, auto_class=AutoModelForImageTextToText,
                      hub_layout=True, max_shard_size="80KB")  # fmt: skip
    assert "model.language_model.layers.0.mlp.experts.3.up_proj.weight" in shard_files(base)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS)
    adapter = make_adapter(
        base, tmp_path / "adapter", lora, dtype=torch.float32, std=0.2, auto_class=AutoModelForImageTextToText
    )
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[{"path": adapter}], output=tmp_path / "out")
    assert run_cli(plan, "--quiet").returncode == 0
    reference = peft_merged(base, [adapter], AutoModelForImageTextToText)
    assert_same_model(tmp_path / "out", reference, AutoModelForImageTextToText)


def test_a_parameter_stored_both_fused_and_one_by_one_is_refused_naming_both(tmp_path):
    """transformers loads one of the two layouts; merging into the other would be silently lost."""
    base = build_moe_base(tmp_path / "base", "qwen3_moe")
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    add_tensor(base, fused, torch.zeros(4, 48, 32, dtype=torch.bfloat16), beside="model.embed_tokens.weight")
    adapter = make_moe_adapter(base, tmp_path / "adapter", seed=1)
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[{"path": adapter}], output=tmp_path / "out")
    result = run_cli(plan, "--quiet")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1 and "Traceback" not in result.stderr, err
    assert f"{fused!r}" in err[0] and "'model.layers.0.mlp.experts.0.gate_proj.weight'" in err[0], err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
