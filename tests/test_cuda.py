"""The CUDA path: its planning is tested everywhere; the GPU run itself only where a GPU is visible."""

from pathlib import Path

import pytest
import torch
from helpers.adapters import lora_pair, write_adapter
from helpers.models import write_model
from safetensors.torch import load_file

import shardmerge
from shardmerge.config import load_plan
from shardmerge.planner import build_plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.proj.weight": torch.randn(512, 256, generator=g).to(torch.bfloat16) for i in range(2)}
    tensors["embed.weight"] = torch.randn(300, 256, generator=g).to(torch.bfloat16)
    write_model(tmp_path / "base", tensors, shards=2)
    adapter = {}
    for i in range(2):
        adapter.update(lora_pair(f"layers.{i}.proj", 512, 256, r=8, seed=i))
    write_adapter(tmp_path / "adapter", adapter, r=8, lora_alpha=16, target_modules=["proj"])
    return tmp_path


def test_cuda_plan_stages_whole_tiles_and_keeps_float32_work_off_the_host(inputs, tmp_path):
    plan = load_plan(
        {
            "base": str(inputs / "base"),
            "adapters": [str(inputs / "adapter")],
            "output": str(tmp_path / "out"),
            "max_memory": "17MiB",
        }
    )
    cpu = build_plan(plan, Path(tmp_path / "s1"), "cpu")
    gpu = build_plan(plan, Path(tmp_path / "s2"), "cuda:0")
    merged = [t for s in gpu.shards for t in s.tasks if t.terms]
    assert all(t.chunk_rows == t.rows_per_tile for t in merged)  # one chunk per tile: the GPU merges it whole
    assert any(t.rows_per_tile < t.source.shape[0] for t in merged)  # and the 1 MiB budget does split tensors
    assert gpu.buffers.work_elems >= max(t.rows_per_tile * 256 for t in merged)
    assert gpu.buffers.total - 4 * gpu.buffers.work_elems * gpu.buffers.work_factor <= plan.max_memory
    assert cpu.buffers.total <= plan.max_memory


@needs_cuda
def test_gpu_merge_matches_cpu_within_float32_rounding_of_the_delta(inputs, tmp_path):
    for device in ("cpu", "cuda"):
        shardmerge.merge(
            {
                "base": str(inputs / "base"),
                "adapters": [str(inputs / "adapter")],
                "output": str(tmp_path / device),
                "device": device,
                "max_memory": "17MiB",
            }
        )
    for shard in (tmp_path / "cpu").glob("*.safetensors"):
        cpu, gpu = load_file(str(shard)), load_file(str(tmp_path / "cuda" / shard.name))
        for name in cpu:
            # Both round a float32 sum once; they may differ by one bf16 step where float32 deltas differ.
            step = cpu[name].float().abs() * 2**-7 + 1e-6
            assert ((cpu[name].float() - gpu[name].float()).abs() <= step).all(), name


def test_reader_hands_the_merger_host_tensors_only(inputs, tmp_path, monkeypatch):
    # CUDA ordering starts here: the reader thread never touches the device (no upload on the default
    # stream); the merger builds the factors, on CUDA on its compute stream (cuda.Streams.factors).
    import threading

    from shardmerge import executor as executor_mod

    made_on = []
    real = executor_mod.Executor._factors

    def recording(self, task, host):
        assert all(t.device.type == "cpu" for t in host.values())
        made_on.append(threading.current_thread().name)
        return real(self, task, host)

    monkeypatch.setattr(executor_mod.Executor, "_factors", recording)
    shardmerge.merge(
        {
            "base": str(inputs / "base"),
            "adapters": [str(inputs / "adapter")],
            "output": str(tmp_path / "out"),
            "device": "cpu",
            "max_memory": "17MiB",
        }
    )
    assert made_on and set(made_on) == {"merger"}


@needs_cuda
def test_gpu_merge_of_many_small_tiles_is_identical_run_after_run(inputs, tmp_path):
    # Races between the copy and compute streams (a factor or tile read before its upload lands, a slab
    # reused before its copy back) show up as outputs that differ between runs of the same plan.
    plan = {
        "base": str(inputs / "base"),
        "adapters": [str(inputs / "adapter")],
        "device": "cuda",
        "max_memory": "16392KiB",
        "max_gpu_memory": "64KiB",
    }
    for run in range(3):
        shardmerge.merge({**plan, "output": str(tmp_path / f"run{run}")})
    for shard in (tmp_path / "run0").glob("*.safetensors"):
        assert all((tmp_path / f"run{r}" / shard.name).read_bytes() == shard.read_bytes() for r in (1, 2))
