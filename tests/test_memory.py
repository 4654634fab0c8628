"""max_memory is a bound: a merge whose tensors are several times the budget stays within it, and is exact."""

import json
import os
import subprocess
import sys

import torch
from helpers.adapters import lora_pair, q_proj_case, write_adapter
from helpers.models import write_model
from helpers.plans import run_cli, write_plan
from safetensors.torch import load_file

MiB = 2**20


def idle_rss() -> int:
    code = "import resource, torch, shardmerge; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_tensors_larger_than_budget_merge_exactly_within_budget(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows, cols = 12288, 2048  # 48 MiB each in bf16, 96 MiB as float32 work: 4x the budget
    tensors = {f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16) for i in range(3)}
    tensors["embed.weight"] = torch.randn(1024, cols, generator=g).to(torch.bfloat16)
    write_model(tmp_path / "base", tensors, shards=2)
    adapter = {}
    for i in range(3):
        adapter.update(lora_pair(f"layers.{i}.proj", rows, cols, r=8, seed=i))
    write_adapter(tmp_path / "adapter", adapter, r=8, lora_alpha=16, target_modules=["proj"])
    budget = 24 * MiB  # 16 MiB of fixed run overhead + 8 MiB of buffers
    plan = write_plan(tmp_path / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory=budget)
    result = run_cli(plan, "-q", "--report-json", tmp_path / "report.json", process=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())

    above_idle = report["peak_rss_bytes"] - idle_rss()
    assert above_idle <= budget, f"peak RSS {above_idle / MiB:.1f} MiB above idle, budget {budget / MiB:.0f} MiB"

    merged = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    for i in range(3):
        a = adapter[f"base_model.model.layers.{i}.proj.lora_A.weight"].double()
        b = adapter[f"base_model.model.layers.{i}.proj.lora_B.weight"].double()
        w = tensors[f"layers.{i}.proj.weight"].double()
        exact = w + 2.0 * (b @ a)
        # Rounded once from float32: within half a bf16 step of the exact value, plus the float32 arithmetic's
        # own error, which is relative to its operands: |W| and the sum of |products| in B @ A (16 float32 steps).
        operands = w.abs() + 2.0 * (b.abs() @ a.abs())
        error = (merged[f"layers.{i}.proj.weight"].double() - exact).abs()
        assert (error <= exact.abs() * 2**-8 + operands * 2**-20).all()
    assert torch.equal(merged["embed.weight"], tensors["embed.weight"])


def test_output_bytes_do_not_depend_on_the_budget(tmp_path):
    # The merge arithmetic runs in fixed-size chunks, so tiles of different sizes give the same bytes.
    g = torch.Generator().manual_seed(3)
    tensors = {f"layers.{i}.proj.weight": torch.randn(2048, 512, generator=g).to(torch.bfloat16) for i in range(2)}
    write_model(tmp_path / "base", tensors, shards=2)
    adapter = {}
    for i in range(2):
        adapter.update(lora_pair(f"layers.{i}.proj", 2048, 512, r=8, seed=i))
    write_adapter(tmp_path / "adapter", adapter, r=8, lora_alpha=16, target_modules=["proj"])
    import shardmerge

    for budget in ("21MiB", "512MiB"):
        shardmerge.merge(
            {
                "base": str(tmp_path / "base"),
                "adapters": [str(tmp_path / "adapter")],
                "output": str(tmp_path / budget),
                "max_memory": budget,
                "device": "cpu",
            }
        )
    for shard in (tmp_path / "21MiB").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "512MiB" / shard.name).read_bytes()


def test_merging_a_text_model_never_imports_transformers(tmp_path):
    # Importing transformers costs a merging process ~35 MiB that max_memory does not budget for.
    base, adapter = q_proj_case(tmp_path)  # square q_proj of a known model type: its layout is looked up
    code = (
        "import sys, shardmerge; "
        "shardmerge.merge({'base': sys.argv[1], 'adapters': [{'path': sys.argv[2]}], 'output': sys.argv[3]}); "
        "print('transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(base), str(adapter), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _proj_model(tmp_path, layers: int = 2):
    """A base of bf16 projections in two shards, and a LoRA on each: merged tensors of 2 MiB."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        f"layers.{i}.proj.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16) for i in range(layers)
    }
    write_model(tmp_path / "base", tensors, shards=2)
    adapter = {}
    for i in range(layers):
        adapter.update(lora_pair(f"layers.{i}.proj", 1024, 1024, r=8, seed=i))
    write_adapter(tmp_path / "adapter", adapter, r=8, lora_alpha=16, target_modules=["proj"])


def test_merged_tensors_read_in_place_give_the_bytes_of_tensors_read_into_slabs(tmp_path, monkeypatch):
    from shardmerge.stores.local import LocalReader, LocalStore

    _proj_model(tmp_path)
    mapped = []
    real_map = LocalReader.map
    monkeypatch.setattr(
        LocalReader, "map", lambda self, offset, length: mapped.append(length) or real_map(self, offset, length)
    )
    for out in ("in-place", "slabs"):
        plan = write_plan(tmp_path / f"{out}.yaml", base="base", adapters=["adapter"], output=out, max_memory="256MiB")
        result = run_cli(plan, "-q")
        assert result.returncode == 0, result.stderr
        monkeypatch.setattr(LocalStore, "maps_files", False)
    assert sum(mapped) == 2 * 1024 * 1024 * 2  # both merged tensors were mapped in the first run, none in the second
    for shard in sorted((tmp_path / "in-place").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "slabs" / shard.name).read_bytes(), shard.name


def test_a_base_shard_truncated_during_the_merge_is_one_line_naming_it(tmp_path, monkeypatch):
    from shardmerge.stores.local import LocalReader

    _proj_model(tmp_path)
    real_map = LocalReader.map

    def truncated_first(self, offset, length):
        os.truncate(self.path, offset + length // 2)  # as another program would, after the plan read the header
        return real_map(self, offset, length)

    monkeypatch.setattr(LocalReader, "map", truncated_first)
    plan = write_plan(tmp_path / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory="256MiB")
    result = run_cli(plan, "-q")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "base/model-0000" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out" / "shardmerge-manifest.json").exists()


def test_a_filesystem_that_cannot_map_files_is_read_into_slabs_with_the_same_bytes(tmp_path, monkeypatch):
    import errno

    import shardmerge.stores.local as local

    _proj_model(tmp_path)
    plan = write_plan(tmp_path / "mapped.yaml", base="base", adapters=["adapter"], output="mapped", max_memory="256MiB")
    assert run_cli(plan, "-q").returncode == 0

    def cannot_map(*args):
        raise OSError(errno.ENODEV, "No such device")  # what mmap says on a filesystem without it

    monkeypatch.setattr(local, "Mapped", cannot_map)
    plan = write_plan(tmp_path / "read.yaml", base="base", adapters=["adapter"], output="read", max_memory="256MiB")
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    for shard in sorted((tmp_path / "mapped").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "read" / shard.name).read_bytes(), shard.name


def test_a_failed_merge_leaves_no_window_on_the_base_mapped(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    import pytest

    from shardmerge import merge
    from shardmerge.errors import ShardmergeError
    from shardmerge.stores.local import LocalPending

    _proj_model(tmp_path, layers=8)
    real_write, calls = LocalPending.write, []

    def disk_full_at_the_third_write(self, buffer, offset):
        calls.append(offset)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, buffer, offset)

    monkeypatch.setattr(LocalPending, "write", disk_full_at_the_third_write)
    plan = write_plan(tmp_path / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory="256MiB")
    with pytest.raises(ShardmergeError) as failure:  # the exception, and what it holds, stays alive here
        merge(str(plan))
    assert "no space left on device" in str(failure.value)
    assert str(tmp_path / "base") not in Path("/proc/self/maps").read_text()
