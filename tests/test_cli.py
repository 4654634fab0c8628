"""The command line as a user meets it: plan validation, overrides, dry runs, one-line errors."""

import json
from functools import partial

import pytest
import torch
from helpers import plans
from helpers.adapters import lora_pair, q_proj_case, write_adapter
from helpers.plans import write_plan
from safetensors.torch import load_file

run_cli = partial(plans.run_cli, process=True)  # a real interpreter: the exit code and streams a shell sees


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def inputs(tmp_path):
    base, adapter = q_proj_case(tmp_path)
    return tmp_path, base, adapter


def test_merge_writes_same_shard_names_index_and_config(inputs):
    tmp, base, adapter = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=[{"path": "adapter"}], output="out")
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp / "out").iterdir())
    assert names == sorted([p.name for p in base.iterdir()] + ["shardmerge-manifest.json"])
    index = json.loads((tmp / "out" / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(str(tmp / "out" / shard)))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_relative_paths_resolve_against_the_plan_file(inputs, tmp_path):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    assert run_cli(plan, "-q", cwd=elsewhere).returncode == 0
    assert (tmp / "out" / "shardmerge-manifest.json").exists()


def test_dry_run_lists_targets_with_rank_and_scaling_and_writes_nothing(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    result = run_cli(plan, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout
    assert "r=4 scale=2" in result.stdout
    assert "to read" in result.stdout and "to write" in result.stdout
    assert not (tmp / "out").exists()


def test_overrides_replace_plan_keys(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    result = run_cli(plan, "-q", "--output", tmp / "other", "--dtype", "float32", "--max-memory", "17MiB")
    assert result.returncode == 0, result.stderr
    shard = next((tmp / "other").glob("model-*.safetensors"))
    assert all(t.dtype == torch.float32 for t in load_file(str(shard)).values())


@pytest.mark.parametrize(
    "plan, needle",
    [
        ({"base": "base", "adapters": ["adapter"], "output": "out", "colour": "red"}, "unknown key 'colour'"),
        ({"base": "base", "adapters": ["adapter"]}, "missing required key 'output'"),
        ({"base": "base", "adapters": ["adapter"], "output": "out", "max_memory": "lots"}, "max_memory"),
        ({"base": "base", "adapters": [{"path": "adapter", "weight": "heavy"}], "output": "out"}, "weight"),
        ({"base": "base", "adapters": [{"path": "adapter", "weight": float("inf")}], "output": "out"}, "weight"),
        ({"base": "base", "adapters": [{"path": "adapter", "weight": 10**400}], "output": "out"}, "weight"),
        ({"base": "base", "adapters": [{"path": "adapter", "scale": 2}], "output": "out"}, "unknown key 'scale'"),
        ({"base": "nowhere", "adapters": ["adapter"], "output": "out"}, "nowhere"),
        ({"base": "base", "adapters": ["adapter"], "output": "out", "device": "tpu"}, "device"),
    ],
)
def test_invalid_plan_is_one_line_error(inputs, plan, needle):
    tmp, _, _ = inputs
    assert_one_line_error(run_cli(write_plan(tmp / "plan.yaml", **plan)), needle)
    assert not (tmp / "out").exists()


def test_a_key_given_twice_in_the_plan_is_one_line_error_naming_it(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    plan.write_text(plan.read_text() + "output: elsewhere\n")  # YAML would silently keep the last one
    assert_one_line_error(run_cli(plan), "key 'output' is given twice", str(plan))
    assert not (tmp / "out").exists() and not (tmp / "elsewhere").exists()


def test_plan_key_that_is_a_list_is_one_line_error(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    plan.write_text(plan.read_text() + "? [a, b]\n: 1\n")
    assert_one_line_error(run_cli(plan), "unhashable key", str(plan))


def test_missing_plan_file_is_one_line_error(tmp_path):
    assert_one_line_error(run_cli(tmp_path / "absent.yaml"), "absent.yaml")


def test_adapter_key_without_base_tensor_is_refused_before_writing(inputs):
    tmp, _, _ = inputs
    write_adapter(tmp / "stray", lora_pair("model.layers.9.self_attn.q_proj", 16, 16))
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["stray"], output="out")
    assert_one_line_error(run_cli(plan), "model.layers.9.self_attn.q_proj")
    assert not (tmp / "out").exists()


def test_shape_mismatch_names_adapter_and_base_tensor(inputs):
    tmp, _, _ = inputs
    write_adapter(tmp / "wide", lora_pair("model.layers.0.self_attn.q_proj", 16, 24))
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["wide"], output="out")
    assert_one_line_error(run_cli(plan), "model.layers.0.self_attn.q_proj", "do not fit")


def test_non_empty_foreign_output_is_refused_without_overwrite(inputs):
    tmp, _, _ = inputs
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    assert_one_line_error(run_cli(plan), str(tmp / "out"), "overwrite")
    assert (tmp / "out" / "notes.txt").read_text() == "mine"
    assert run_cli(plan, "-q", "--overwrite").returncode == 0
    assert not (tmp / "out" / "notes.txt").exists()


def test_truncated_shard_is_one_line_error_naming_it(inputs):
    tmp, base, _ = inputs
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    assert_one_line_error(run_cli(plan), shard.name)
    assert not (tmp / "out" / "shardmerge-manifest.json").exists()


def test_safe_merge_refuses_nan_naming_the_tensor(inputs):
    tmp, _, _ = inputs
    pair = lora_pair("model.layers.1.self_attn.q_proj", 16, 16)
    pair["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
    write_adapter(tmp / "broken", pair)
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["broken"], output="out", safe_merge=True)
    assert_one_line_error(run_cli(plan), "model.layers.1.self_attn.q_proj.weight", "NaN")
    assert not (tmp / "out" / "shardmerge-manifest.json").exists()
    assert not (tmp / "out" / "model.safetensors.index.json").exists()


def test_budget_too_small_for_one_row_is_a_plan_time_error(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory=16 * 2**20 + 256)
    assert_one_line_error(run_cli(plan), "max_memory", "too small for tensor")
    assert not (tmp / "out").exists()


def test_budget_below_the_runs_fixed_overhead_is_a_plan_time_error_saying_what_is_needed(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory="4MiB")
    assert_one_line_error(run_cli(plan), "max_memory 4.0MiB is too small", "at least 17.0MiB")
    assert not (tmp / "out").exists()


def test_rerun_over_finished_output_is_a_verified_no_op(inputs):
    tmp, _, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    assert run_cli(plan, "-q").returncode == 0
    again = run_cli(plan)
    assert again.returncode == 0
    assert "already complete" in again.stderr


def test_library_call_returns_report(inputs):
    import shardmerge

    tmp, _, _ = inputs
    report = shardmerge.merge(
        {
            "base": str(tmp / "base"),
            "adapters": [str(tmp / "adapter")],
            "output": str(tmp / "out"),
            "max_memory": "17MiB",
        }
    )
    assert report.tensors_merged == 2
    assert report.tensors_copied == 4
    assert report.bytes_written > 0 and report.seconds > 0 and report.peak_rss_bytes > 0
    assert set(report.stage_seconds) == {"read", "merge", "write", "copy", "hash"}


def test_output_path_that_is_a_file_is_one_line_error(inputs):
    tmp, _, _ = inputs
    (tmp / "out").write_text("not a directory")
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="out")
    assert_one_line_error(run_cli(plan), "out")
    assert (tmp / "out").read_text() == "not a directory"


def test_max_shard_size_reshards_with_index_and_same_tensors(inputs):
    tmp, base, _ = inputs
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["adapter"], output="keep")
    assert run_cli(plan, "-q").returncode == 0
    assert run_cli(plan, "-q", "--output", tmp / "resharded", "--max-shard-size", "600").returncode == 0
    shards = sorted((tmp / "resharded").glob("*.safetensors"))
    assert len(shards) > 3 and all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((tmp / "resharded" / "model.safetensors.index.json").read_text())
    resharded, kept = {}, {}
    for shard in shards:
        part = load_file(str(shard))
        assert all(index["weight_map"][name] == shard.name for name in part)
        resharded.update(part)
    for shard in (tmp / "keep").glob("*.safetensors"):
        kept.update(load_file(str(shard)))
    assert resharded.keys() == kept.keys()
    assert all(torch.equal(resharded[k], kept[k]) for k in kept)


def test_safe_merge_catches_overflow_when_rounding_to_float16(inputs):
    tmp, _, _ = inputs
    pair = lora_pair("model.layers.0.self_attn.q_proj", 16, 16)
    pair["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] *= 1e5  # finite in float32, not in fp16
    write_adapter(tmp / "loud", pair)
    plan = write_plan(tmp / "plan.yaml", base="base", adapters=["loud"], output="out", safe_merge=True, dtype="float16")
    assert_one_line_error(run_cli(plan), "model.layers.0.self_attn.q_proj.weight", "NaN or Inf")
