"""`shardmerge verify OUTPUT [--plan PLAN]`: a good output passes; each kind of damage is caught and named.

One finished merge of the test model is made per module; every test damages its own copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import models  # noqa: E402
from helpers.adapters import lora_pair, write_adapter, write_tiny_adapter  # noqa: E402
from helpers.plans import run_cli, write_plan  # noqa: E402

from shardmerge.safetensors_io import read_header  # noqa: E402
from shardmerge.stores.local import file_checksum  # noqa: E402
from shardmerge.verify import verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGED = "model.layers.1.mlp.down_proj.weight"  # a tensor the adapter changes
COPIED = "lm_head.weight"  # a tensor the adapter does not touch


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = models.write_tiny_base(root / "base")
    adapter = write_tiny_adapter(root / "adapter")
    plan = write_plan(root / "plan.yaml", base=base, adapters=[adapter], output=root / "merged", **models.TINY_OPTIONS)
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    return {"out": root / "merged", "plan": plan}


@pytest.fixture
def out(finished, tmp_path) -> Path:
    """A private copy of the finished output, to damage."""
    return Path(shutil.copytree(finished["out"], tmp_path / "merged"))


def index(out: Path) -> dict:
    return json.loads((out / models.INDEX_NAME).read_text())


def write_index(out: Path, value: dict) -> None:
    (out / models.INDEX_NAME).write_text(json.dumps(value, indent=2))


def shard_of(out: Path, tensor: str) -> Path:
    return out / index(out)["weight_map"][tensor]


def only_problem(problems: list[str], *needles: str) -> str:
    assert problems, "verify found nothing wrong"
    joined = "\n".join(problems)
    for needle in needles:
        assert needle in joined, f"{needle!r} not named in:\n{joined}"
    return joined


# -- a good output --------------------------------------------------------------------------------------------
def test_good_output_passes_verify_through_python_m_shardmerge(finished):
    proc = run_cli("verify", finished["out"], cwd=ROOT, process=True)  # python -m finds the package from ROOT
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stderr and "Traceback" not in proc.stderr


def test_good_output_passes_recomputation_of_every_merged_tensor(finished):
    assert verify(str(finished["out"]), plan=str(finished["plan"]), samples=10_000) == []


def test_good_output_passes_verify_plan_through_cli(finished):
    result = run_cli("verify", finished["out"], "--plan", finished["plan"])
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stderr


def test_a_negative_sample_count_is_refused_rather_than_reported_ok(finished):
    result = run_cli("verify", finished["out"], "--plan", finished["plan"], "--samples", "-3", cwd=ROOT, process=True)
    assert result.returncode == 2 and "--samples" in result.stderr and "OK" not in result.stderr, result.stderr


# -- damaged shards -------------------------------------------------------------------------------------------
def test_flipped_byte_in_a_shard_is_caught_by_checksum(out):
    shard = shard_of(out, COPIED)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    only_problem(verify(str(out)), shard.name, "checksum")


def test_flipped_byte_fails_verify_cli_with_exit_1_and_a_count(out):
    shard = shard_of(out, MERGED)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x80
    shard.write_bytes(bytes(data))
    result = run_cli("verify", out)
    assert result.returncode == 1
    assert shard.name in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"shardmerge: verify: 1 problem(s) in {out}"


def test_truncated_shard_is_caught(out):
    shard = shard_of(out, MERGED)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    only_problem(verify(str(out)), shard.name, "size")


def test_missing_shard_is_caught(out):
    shard = shard_of(out, MERGED)
    shard.unlink()
    only_problem(verify(str(out)), shard.name, "missing")


def test_stray_extra_shard_is_caught(out):
    stray = out / "model-00008-of-00008.safetensors"
    shutil.copyfile(shard_of(out, COPIED), stray)
    only_problem(verify(str(out)), stray.name, "not listed")


def test_missing_manifest_means_unfinished(out):
    (out / models.MANIFEST_NAME).unlink()
    only_problem(verify(str(out)), models.MANIFEST_NAME, "did not finish")


def test_missing_copied_config_file_is_caught(out):
    """The manifest records the base's other files it copied (config, tokenizer); without config.json the
    output no longer loads with transformers, so verify should say so."""
    manifest = json.loads((out / models.MANIFEST_NAME).read_text())
    assert "config.json" in manifest["copied_files"]
    (out / "config.json").unlink()
    only_problem(verify(str(out)), "config.json")


# -- a wrong index ------------------------------------------------------------------------------------------
def test_index_mapping_a_tensor_to_the_wrong_shard_is_caught(out):
    value = index(out)
    right = value["weight_map"][MERGED]
    wrong = next(s for s in sorted(set(value["weight_map"].values())) if s != right)
    value["weight_map"][MERGED] = wrong
    write_index(out, value)
    only_problem(verify(str(out)), models.INDEX_NAME, MERGED, wrong)


def test_index_with_wrong_total_size_is_caught(out):
    value = index(out)
    value["metadata"]["total_size"] += 2
    write_index(out, value)
    only_problem(verify(str(out)), models.INDEX_NAME, "total_size")


def test_index_missing_a_tensor_is_caught(out):
    value = index(out)
    del value["weight_map"][MERGED]
    write_index(out, value)
    only_problem(verify(str(out)), models.INDEX_NAME, MERGED)


def test_missing_index_is_caught(out):
    (out / models.INDEX_NAME).unlink()
    only_problem(verify(str(out)), models.INDEX_NAME)


# -- recomputation catches what checksums cannot -----------------------------------------------------------------
def alter_consistently(out: Path, tensors: list[str]) -> None:
    """Change merged values in place (the header stays valid) and re-checksum the shards in the manifest,
    so that only a recomputation from the inputs can tell."""
    import torch

    manifest = json.loads((out / models.MANIFEST_NAME).read_text())
    for name in tensors:
        shard = shard_of(out, name)
        info = read_header(shard).tensors[name]
        data = bytearray(shard.read_bytes())
        values = torch.frombuffer(data[info.offset : info.offset + info.nbytes], dtype=torch.bfloat16).clone()
        values[: values.numel() // 8] += 0.01  # the first rows, by far more than rounding
        data[info.offset : info.offset + info.nbytes] = values.view(torch.uint8).numpy().tobytes()
        shard.write_bytes(bytes(data))
        manifest["shards"][shard.name]["xxh3_128"] = file_checksum(shard)
    (out / models.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def test_consistently_altered_tensor_passes_checksums_but_fails_recomputation(out, finished):
    alter_consistently(out, [MERGED])
    assert verify(str(out)) == [], "the alteration should be invisible to the manifest checks"
    result = run_cli("verify", out, "--plan", finished["plan"], "--samples", "1000")
    assert result.returncode == 1
    assert MERGED in result.stderr and shard_of(out, MERGED).name in result.stderr and "recomputation" in result.stderr


def test_default_sample_of_recomputation_catches_altered_merged_tensors(out, finished):
    merged = [t for t in index(out)["weight_map"] if "_proj" in t]
    alter_consistently(out, merged)
    assert verify(str(out)) == []
    problems = verify(str(out), plan=str(finished["plan"]))
    assert problems and all("recomputation" in p for p in problems)


def test_verify_plan_recomputes_a_tensor_four_times_its_budget_within_the_budget(tmp_path):
    import torch

    g = torch.Generator().manual_seed(5)
    rows, cols, budget = 12288, 4096, 24 * 2**20  # 96 MiB in bf16 (384 MiB in float64): 4x the budget
    models.write_model(
        tmp_path / "base",
        {"big.proj.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16), "small.weight": torch.ones(8)},
        shards=2,
    )
    write_adapter(
        tmp_path / "adapter", lora_pair("big.proj", rows, cols, r=8), r=8, lora_alpha=16, target_modules=["proj"]
    )
    plan = write_plan(tmp_path / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory="256MiB")
    assert run_cli(plan, "-q", process=True).returncode == 0

    def peak_rss(*args: str) -> tuple[int, int]:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024

    _, idle = peak_rss("-c", "import torch, shardmerge")
    rc, rss = peak_rss(
        "-m", "shardmerge", "verify", str(tmp_path / "out"), "--plan", str(plan), "--max-memory", str(budget)
    )
    assert rc == 0
    assert rss - idle <= budget, f"verify peaked {(rss - idle) / 2**20:.1f} MiB above idle, budget 24 MiB"


# -- float32 outputs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float32_merge(tmp_path_factory):
    """A float32 base (values ~0.2) with a LoRA (r=4, scale 2, factors ~0.1) on every q_proj: the float32
    merge errs by an epsilon of W where W + delta cancels to a small value."""
    import torch

    root = tmp_path_factory.mktemp("float32")
    g = torch.Generator().manual_seed(3)
    tensors, lora = {}, {}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = 0.2 * torch.randn(64, 64, generator=g)
        lora.update({k: 0.1 * v for k, v in lora_pair(f"model.layers.{i}.self_attn.q_proj", 64, 64, seed=i).items()})
    models.write_model(root / "base", tensors, shards=2)
    write_adapter(root / "adapter", lora)
    plan = write_plan(root / "plan.yaml", base="base", adapters=["adapter"], output="out", device="cpu")
    assert run_cli(plan, "-q").returncode == 0
    return root, plan


def test_verify_plan_accepts_a_float32_merge_where_base_and_delta_cancel(float32_merge):
    root, plan = float32_merge
    assert verify(str(root / "out"), plan=str(plan), samples=100) == []


def test_verify_plan_catches_a_float32_merge_with_the_weight_off_by_a_thousandth(float32_merge, tmp_path):
    root, _ = float32_merge
    adapters = [{"path": root / "adapter", "weight": 0.999}]
    plan = write_plan(tmp_path / "plan.yaml", base=root / "base", adapters=adapters, output=root / "out", device="cpu")
    problems = verify(str(root / "out"), plan=str(plan), samples=100)
    assert len(problems) == 2 and all("recomputation" in p for p in problems)
