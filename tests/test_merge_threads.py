"""On the CPU a tile's chunks are shared by several merge threads where the machine has the cores and no chunk
touches another's bytes; either way the output is byte for byte that of one thread."""

import os

import pytest
import torch
from helpers.adapters import write_adapter
from helpers.models import write_model
from helpers.quant import formats

import shardmerge
from shardmerge.pipeline import Helpers
from shardmerge.stores.local import LocalStore

ROWS, COLS = 2048, 512  # 1 Mi elements: four 256 Ki-element chunks in a tile

# case -> (base dtype or quantized format, output dtype, merged tensors read in place, chunks shared)
CASES = {
    "bf16 read in place": (torch.bfloat16, "keep", True, True),
    "bf16 read into slabs": (torch.bfloat16, "keep", False, True),
    "bf16 widened to float32, read in place": (torch.bfloat16, "float32", True, True),
    # each chunk's output would land on input of other chunks still to be read
    "float32 narrowed to bf16 in slabs": (torch.float32, "bfloat16", False, False),
    "fp8 with block scales, kept": ("fp8:bf16", "keep", True, True),
    # every chunk rewrites the one scale, from the pre-pass's maximum
    "fp8 with one scale, kept": ("ct:tensor:f32", "keep", True, False),
}


def _case(tmp_path, base_kind) -> None:
    g = torch.Generator().manual_seed(0)
    tensors, adapter, config = {}, {}, {}
    for i in range(2):
        module = f"layers.{i}.proj"
        w = torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * 0.05
        if isinstance(base_kind, str):
            fmt = formats()[base_kind]
            tensors.update(fmt.quantize(module, w))
            config = {"quantization_config": fmt.config}
        else:
            tensors[f"{module}.weight"] = w.to(base_kind)
        adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, COLS, generator=g) * 0.05
        adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(ROWS, 8, generator=g) * 0.05
    write_model(tmp_path / "base", tensors, shards=1, config=config)
    write_adapter(tmp_path / "adapter", adapter, r=8, lora_alpha=16, target_modules=["proj"])


def _merge(tmp_path, monkeypatch, cores: int, dtype: str, out: str) -> tuple[object, int]:
    """The merge with `cores` cores to use, and the most parts a tile's chunks were split into. The parts run
    one after another, the last first: the schedule most likely to show a chunk that reads another's output."""
    parts = [1]

    def last_first(self, p):
        parts.append(len(p))
        for part in reversed(p):
            part()

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(Helpers, "run", last_first)
    plan = {"base": str(tmp_path / "base"), "adapters": [{"path": str(tmp_path / "adapter")}]}
    report = shardmerge.merge({**plan, "output": str(tmp_path / out), "dtype": dtype, "max_memory": "1GiB"})
    return report, max(parts)


@pytest.mark.parametrize("case", CASES)
def test_chunks_merged_on_several_threads_give_the_bytes_of_one_thread(tmp_path, monkeypatch, case):
    base_kind, dtype, in_place, shared = CASES[case]
    _case(tmp_path, base_kind)
    monkeypatch.setattr(LocalStore, "maps_files", in_place)
    one, parts_one = _merge(tmp_path, monkeypatch, 1, dtype, "one")
    four, parts_four = _merge(tmp_path, monkeypatch, 4, dtype, "four")
    assert (parts_one, parts_four) == (1, 4 if shared else 1)
    assert (tmp_path / "four" / "model.safetensors").read_bytes() == (
        tmp_path / "one" / "model.safetensors"
    ).read_bytes()
    assert four.delta_survival == pytest.approx(one.delta_survival, rel=1e-5)
    assert 0 < four.peak_budget_bytes <= 2**30


def test_a_budget_without_room_for_another_merge_thread_merges_on_one(tmp_path, monkeypatch):
    _case(tmp_path, torch.bfloat16)
    real_run, parts = Helpers.run, []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(Helpers, "run", lambda self, p: parts.append(len(p)) or real_run(self, p))
    plan = {
        "base": str(tmp_path / "base"),
        "adapters": [{"path": str(tmp_path / "adapter")}],
        "output": str(tmp_path / "o"),
    }
    report = shardmerge.merge({**plan, "max_memory": "24MiB"})
    assert parts and max(parts) == 1 and report.peak_budget_bytes <= 24 * 2**20


def test_helpers_wait_for_every_part_before_raising_the_first_failure():
    import threading
    import time

    ended, helpers = [], Helpers(3, "test")

    def slow():
        time.sleep(0.2)
        ended.append(threading.current_thread().name)

    def failing():
        raise ValueError("first")

    try:
        with pytest.raises(ValueError, match="first"):
            helpers.run([failing, slow, slow])
        assert len(ended) == 2 and all(name.startswith("test") for name in ended)  # on the helpers, both done
    finally:
        helpers.close()
