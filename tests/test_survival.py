"""Delta survival on large tensors: summed on a fixed sample of rows (runs placed by row number), the same
whatever the tiling, and close to the share over every row."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import lora_pair, write_adapter
from helpers.models import write_model
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from shardmerge import merge
from shardmerge.mergemath import SURVIVAL_EXACT_ELEMS, SURVIVAL_RUN_ELEMS, SURVIVAL_STRIDE, sampled_ranges

OUT, IN = 1280, 1024  # above SURVIVAL_EXACT_ELEMS: sampled
NAME = "model.layers.0.mlp.up_proj.weight"
MODULE = "model.layers.0.mlp.up_proj"


@given(
    r0=st.integers(0, 5000),
    length=st.integers(0, 3000),
    run=st.integers(1, 64),
    runs_per_period=st.integers(1, 20),
    cut=st.integers(1, 700),
)
def test_sampled_ranges_cover_exactly_the_sampled_rows_however_the_rows_are_cut(r0, length, run, runs_per_period, cut):
    period = run * runs_per_period
    r1 = r0 + length
    got = []
    for start in range(r0, r1, cut):
        for a, b in sampled_ranges(start, min(start + cut, r1), run, period):
            assert start <= a < b <= min(start + cut, r1)
            got.extend(range(a, b))
    assert got == [r for r in range(r0, r1) if r % period < run]


def _case(tmp_path, seed: int = 0):
    assert OUT * IN > SURVIVAL_EXACT_ELEMS
    g = torch.Generator().manual_seed(seed)
    # Small weights next to a relatively large delta, with a few rows 100x larger: bf16 rounds those rows'
    # share of the delta away far more, so a sample that missed or over-weighted them would show it.
    w = torch.randn(OUT, IN, generator=g) * 0.02
    w[::97] *= 100
    base = write_model(tmp_path / "base", {NAME: w.to(torch.bfloat16)}, shards=1)
    pair = {k: v * 0.05 for k, v in lora_pair(MODULE, OUT, IN, r=8, seed=seed + 1).items()}
    adapter = write_adapter(tmp_path / "adapter", pair, r=8, lora_alpha=16, target_modules=["up_proj"])
    delta = (
        2.0
        * pair[f"base_model.model.{MODULE}.lora_B.weight"].double()
        @ pair[f"base_model.model.{MODULE}.lora_A.weight"].double()
    )
    return base, adapter, delta


def _run(tmp_path, base, adapter, name: str, **options):
    out = tmp_path / name
    report = merge({"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(out), **options})
    return report.delta_survival[NAME], load_file(str(out / "model.safetensors"))[NAME].double()


def test_survival_of_a_large_tensor_is_the_direct_share_over_its_sampled_rows(tmp_path):
    base, adapter, delta = _case(tmp_path)
    reported, out = _run(tmp_path, base, adapter, "out")
    w = load_file(str(base / "model.safetensors"))[NAME].double()
    run = SURVIVAL_RUN_ELEMS // IN
    rows = [r for r in range(OUT) if r % (run * SURVIVAL_STRIDE) < run]
    assert len(rows) < OUT // 8
    sampled = ((out[rows] - w[rows]).norm() / delta[rows].norm()).item()
    everywhere = ((out - w).norm() / delta.norm()).item()
    assert reported == pytest.approx(sampled, rel=1e-5)
    assert reported == pytest.approx(everywhere, rel=0.02)


def test_survival_takes_the_same_sample_whatever_the_budget_or_the_chunking(tmp_path):
    base, adapter, _ = _case(tmp_path)
    small, out_small = _run(tmp_path, base, adapter, "small", max_memory="17MiB")
    large, out_large = _run(tmp_path, base, adapter, "large", max_memory="1GiB")
    assert torch.equal(out_small, out_large)
    assert small == pytest.approx(large, rel=1e-5)  # the same rows; float32 sums taken in other pieces
