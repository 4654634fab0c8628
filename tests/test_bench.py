"""The benchmark harness's own pieces that numbers depend on: the streamed synthetic shards and the mode registry."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from smbench import modes, synthetic  # noqa: E402


def test_streamed_shard_holds_exactly_the_seeded_tensors(tmp_path):
    specs = [("a.weight", (64, 32), "normal"), ("norm.weight", (32,), "norm"), ("b.weight", (8, 32), "normal")]
    path = tmp_path / "model.safetensors"
    synthetic.write_shard_streaming(path, specs, seed=3)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == sorted(name for name, _, _ in specs)
        for name, shape, init in specs:
            assert torch.equal(f.get_tensor(name), synthetic.make_tensor(name, shape, init, 3, torch.bfloat16))


def test_every_mode_module_is_found_and_listed_by_the_script():
    names = [m.NAME for m in modes.modes()]
    assert {"generate", "compare", "sweep", "ranks", "large", "reflink", "gpu", "smoke"} <= set(names)
    usage = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(name in usage for name in names)
