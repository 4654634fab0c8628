"""The pure parts of expert LoRA (shardmerge.experts, mergemath.add_experts) against float64 math written here,
the checkpoint layout table against transformers' conversion rules, and memory and the dry run on a fused
expert parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.adapters import write_adapter
from helpers.models import write_model
from helpers.moe import moe_config
from safetensors.torch import load_file

import shardmerge
from shardmerge import experts, mergemath
from shardmerge.config import load_plan
from shardmerge.errors import ShardmergeError
from shardmerge.experts import GROUPED_BY_EXPERT, RANK_MAJOR, ExpertSlice
from shardmerge.planner import build_plan
from shardmerge.runner import run

E, R, D1, D2 = 3, 2, 5, 4


def _packed(swap: bool, layout: str, seed: int = 0):
    """Random per-expert factors and PEFT's (or Unsloth's) packing of them, written out here by index."""
    g = torch.Generator().manual_seed(seed)
    a_dim, b_dim = (D2, D1) if swap else (D1, D2)
    a_e = torch.randn(E, R, a_dim, generator=g, dtype=torch.float64)
    b_e = torch.randn(E, b_dim, R, generator=g, dtype=torch.float64)
    a = torch.zeros(R * E, a_dim, dtype=torch.float64)
    b = torch.zeros(b_dim, R * E, dtype=torch.float64)
    for e in range(E):
        for k in range(R):
            a[e * R + k] = a_e[e, k]
            b[:, k * E + e if layout == RANK_MAJOR else e * R + k] = b_e[e, :, k]
    delta = torch.stack([b_e[e] @ a_e[e] if swap else a_e[e].T @ b_e[e].T for e in range(E)])
    return a, b, delta  # delta (E, D1, D2)


@pytest.mark.parametrize("layout", [RANK_MAJOR, GROUPED_BY_EXPERT])
@pytest.mark.parametrize("swap", [True, False])
def test_expert_factors_unpack_peft_packing_in_either_orientation(swap, layout):
    a, b, delta = _packed(swap, layout)
    left, right = experts.expert_factors(a, b, E, layout, swap, ExpertSlice(0, E, 0, D1))
    assert torch.allclose(left @ right, delta, rtol=0, atol=1e-12)


def test_expert_factors_match_peft_einsum_for_rank_major():
    """PEFT's own formula (ParamWrapper.get_delta_weight) on the same packed tensors."""
    a, b, _ = _packed(True, RANK_MAJOR)
    peft = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], R, E), a.reshape(E, R, -1))
    left, right = experts.expert_factors(a, b, E, RANK_MAJOR, True, ExpertSlice(0, E, 0, D1))
    assert torch.allclose(left @ right, peft, rtol=0, atol=1e-12)


def test_one_experts_row_range_needs_only_that_expert():
    a, b, delta = _packed(True, RANK_MAJOR)
    part = ExpertSlice(1, 1, 2, 5)
    info_a, info_b = experts.narrowed_reads(_info("a", a.shape), _info("b", b.shape), E, True, part)
    assert (info_a.shape, info_a.offset) == ((R, D2), R * D2 * 2)
    assert (info_b.shape, info_b.offset) == ((3, R * E), 2 * R * E * 2)
    left, right = experts.expert_factors(a[R : 2 * R], b[2:5], E, RANK_MAJOR, True, part)
    assert left.shape == (1, 3, R)
    assert torch.allclose(left[0] @ right[0], delta[1, 2:5], rtol=0, atol=1e-12)


def test_interleaved_rows_are_stored_gate_up_alternating():
    assert ExpertSlice(0, 1, 0, 6, interleaved=True).row_order() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("transposed", [False, True])
def test_add_experts_on_row_tiles_that_cut_experts_equals_the_whole_delta(transposed):
    a, b, delta = _packed(True, RANK_MAJOR)
    left, right = experts.expert_factors(a, b, E, RANK_MAJOR, True, ExpertSlice(0, E, 0, D1))
    stored = delta.transpose(1, 2) if transposed else delta
    want = stored.reshape(-1, stored.shape[2]) * 0.5
    got = torch.zeros_like(want)
    for r0 in range(0, want.shape[0], 4):  # tiles of 4 rows: most start or end inside an expert
        r1 = min(r0 + 4, want.shape[0])
        mergemath.add_experts(got[r0:r1], left, right, 0.5, transposed, r0, r1)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("version", "rule"), [
    ("0.17.1", "never"), ("0.18.1", "never"), ("0.19.0.dev0", "never"), ("0.19.0", "if is_transposed"),
    ("0.19.1.dev0@abc", None), ("0.19.1", "unless is_transposed"), ("0.21.2", "unless is_transposed"),
    ("0.22.0.dev0@1234", "unless is_transposed"), (None, None), ("unknown", None),
])  # fmt: skip
def test_swap_rule_follows_the_saving_peft_version(version, rule):
    assert experts.swap_rule(version) == rule


def test_shapes_decide_the_orientation_when_experts_are_not_square():
    # P (E, 6, 4): swapped factors are A (r*E, 4), B (6, r*E); plain ones A (r*E, 6), B (4, r*E). The shapes are
    # what the adapter was trained with, whatever its version says.
    def never_asked():
        raise AssertionError("is_transposed asked although the shapes decide")

    assert experts.swapped((6, 4), (6, 6), 6, 4, None, never_asked, "x") is True
    assert experts.swapped((6, 6), (4, 6), 6, 4, "unless is_transposed", never_asked, "x") is False


def test_square_experts_follow_the_version_rule_and_the_transposed_flag():
    assert experts.swapped((6, 4), (4, 6), 4, 4, "unless is_transposed", lambda: True, "x") is False  # gpt-oss, 0.21
    assert experts.swapped((6, 4), (4, 6), 4, 4, "unless is_transposed", lambda: False, "x") is True  # Llama 4
    assert experts.swapped((6, 4), (4, 6), 4, 4, "if is_transposed", lambda: True, "x") is True  # gpt-oss, 0.19.0
    assert experts.swapped((6, 4), (4, 6), 4, 4, "never", lambda: False, "x") is False


def test_square_experts_without_provenance_are_refused_as_ambiguous():
    with pytest.raises(ShardmergeError, match="layout is ambiguous.*peft_version"):
        experts.swapped((6, 4), (4, 6), 4, 4, None, lambda: True, "adapter: model.layers.0.mlp.experts.down_proj")


def test_factors_that_fit_no_orientation_are_refused():
    with pytest.raises(ShardmergeError, match="fit no orientation"):
        experts.swapped((6, 5), (6, 6), 6, 4, None, lambda: False, "x")


def test_nesting_depth_follows_registration_order():
    loras = [experts.ParamLora("m", depth, None, None) for depth in (0, 1)]
    got = experts.assign_params("m", loras, ["gate_up_proj", "down_proj"])
    assert (got["gate_up_proj"].depth, got["down_proj"].depth) == (1, 0)  # first registered is innermost


def test_builtin_layout_table_agrees_with_transformers_conversion_rules():
    for family, rules in experts.BUILTIN_RULES.items():
        assert experts.transformers_rules(family) == rules, family


def test_builtin_expert_flags_agree_with_transformers_models():
    for family in ("gpt_oss", "qwen3_moe", "mixtral", "llama4"):
        config = moe_config(family)
        facts = experts.module_facts(config.to_dict())
        owner = next(f for name, f in facts.items() if name.startswith("model.layers.0."))
        assert owner.is_transposed == (config.model_type in experts._TRANSPOSED_EXPERTS)
        order = [n for n, _ in owner.params if n in experts._REGISTRATION_ORDER]
        assert order == sorted(order, key=experts._REGISTRATION_ORDER.index)


def test_per_expert_checkpoint_slices_are_gate_then_up_rows():
    shapes = {f"m.experts.{e}.{leaf}.weight": (3, 4) for e in range(2) for leaf in ("gate_proj", "up_proj")}

    def find(name):
        return _info(name, shapes[name]) if name in shapes else None

    shape, parts = experts.checkpoint_slices(
        "m.experts", "gate_up_proj", None, experts.BUILTIN_RULES["qwen2_moe"], find
    )
    assert shape == (2, 6, 4)
    assert parts[:2] == [
        ("m.experts.0.gate_proj.weight", ExpertSlice(0, 1, 0, 3)),
        ("m.experts.0.up_proj.weight", ExpertSlice(0, 1, 3, 6)),
    ]


def test_a_transposed_fused_checkpoint_is_recognised_by_its_shape():
    def find(name):
        return _info(name, (2, 4, 6)) if name == "m.experts.gate_up_proj" else None

    rules = experts.BUILTIN_RULES["qwen3_vl_moe"]
    shape, parts = experts.checkpoint_slices("m.experts", "gate_up_proj", (2, 6, 4), rules, find)
    assert shape == (2, 6, 4) and parts == [("m.experts.gate_up_proj", ExpertSlice(0, 2, 0, 6, transposed=True))]


def _info(name, shape):
    from shardmerge.safetensors_io import TensorInfo

    return TensorInfo(name, "BF16", tuple(shape), Path("x"), 0, 2 * int(torch.tensor(shape).prod()))


# --------------------------------------------------------------------------------------------------
# a fused parameter larger than the budget, and the dry run
# --------------------------------------------------------------------------------------------------


def _fused_case(tmp_path: Path):
    """A Llama-4-style fused base (E, H, 2I) of 72 MiB and an adapter on it, written by hand (float64 reference)."""
    g = torch.Generator().manual_seed(0)
    experts_, hidden, inter, rank = 16, 768, 1536, 1
    name = "model.layers.0.feed_forward.experts.gate_up_proj"
    weights = {
        name: (torch.randn(experts_, hidden, 2 * inter, generator=g) * 0.05).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    config = moe_config("llama4")
    config.update(
        {"hidden_size": hidden, "intermediate_size": inter, "num_local_experts": experts_, "num_hidden_layers": 1}
    )
    base = write_model(tmp_path / "base", weights, shards=1, config=json.loads(config.to_json_string()))
    a = torch.randn(rank * experts_, 2 * inter, generator=g) * 0.2  # swapped: A (r*E, d2), B (d1, r*E)
    b = torch.randn(hidden, rank * experts_, generator=g) * 0.2
    module = f"base_model.model.{name.rpartition('.')[0]}"
    adapter = write_adapter(
        tmp_path / "adapter",
        {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b},
        r=rank,
        lora_alpha=4,
        target_modules=[],
        peft_version="0.21.2",
        target_parameters=["feed_forward.experts.gate_up_proj"],
    )
    a_e = a.double().reshape(experts_, rank, -1)
    b_e = b.double().reshape(hidden, rank, experts_).permute(2, 0, 1)
    exact = weights[name].double() + 4.0 * torch.stack([b_e[e] @ a_e[e] for e in range(experts_)])
    return base, adapter, name, weights[name], exact


def test_a_fused_expert_parameter_four_times_the_budget_merges_within_it(tmp_path):
    base, adapter, name, weight, exact = _fused_case(tmp_path)
    budget = weight.numel() * weight.element_size() // 4
    plan = {
        "base": str(base),
        "adapters": [str(adapter)],
        "output": str(tmp_path / "out"),
        "device": "cpu",
        "max_memory": budget,
    }
    merge_plan = build_plan(load_plan(plan), tmp_path)
    task = next(t for s in merge_plan.shards for t in s.tasks if t.name == name)
    assert merge_plan.buffers.total <= budget and task.rows // task.rows_per_tile >= 4, "not tiled within the budget"
    report = shardmerge.merge(plan)
    assert 0 < report.peak_budget_bytes <= budget
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[name].double()
    # one rounding: every element is within half a bf16 ulp of the float64 merge
    assert ((got - exact).abs() <= torch.finfo(torch.bfloat16).eps / 2 * exact.abs() + 1e-30).all()


def test_dry_run_prints_one_line_per_fused_parameter_with_e_r_scaling_and_layout(tmp_path):
    base, adapter, name, _, _ = _fused_case(tmp_path)
    report = run(
        load_plan({"base": str(base), "adapters": [str(adapter)], "output": str(tmp_path / "out"), "device": "cpu"}),
        dry_run=True,
    )
    lines = [line for line in report.description.splitlines() if line.strip().startswith("experts")]
    assert len(lines) == 1
    assert "E=16 r=1 scale=4" in lines[0] and f"fused {name} [16, 768, 3072]" in lines[0]
