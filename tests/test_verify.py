"""`shardmerge verify OUTPUT [--plan PLAN]`: a good output passes; each kind of damage is caught and named.

One finished merge of the test model is made per module; every test damages its own copy of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

from shardmerge.cli import main as cli_main  # noqa: E402
from shardmerge.safetensors_io import read_header  # noqa: E402
from shardmerge.stores.local import file_checksum  # noqa: E402
from shardmerge.verify import verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGED = "model.layers.1.mlp.down_proj.weight"  # a tensor the adapter changes
COPIED = "lm_head.weight"  # a tensor the adapter does not touch


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = tm.write_base(root / "base")
    adapter = tm.write_adapter(root / "adapter")
    plan = tm.write_plan(root / "plan.yaml", base, adapter, root / "merged")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli_main([str(plan), "-q"]) == 0, err.getvalue()
    return {"out": root / "merged", "plan": plan}


@pytest.fixture
def out(finished, tmp_path) -> Path:
    """A private copy of the finished output, to damage."""
    return Path(shutil.copytree(finished["out"], tmp_path / "merged"))


def run_verify_cli(*args: str) -> tuple[int, str]:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = cli_main(["verify", *map(str, args)])
    return rc, err.getvalue()


def index(out: Path) -> dict:
    return json.loads((out / tm.INDEX_NAME).read_text())


def write_index(out: Path, value: dict) -> None:
    (out / tm.INDEX_NAME).write_text(json.dumps(value, indent=2))


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
    proc = subprocess.run(
        [sys.executable, "-m", "shardmerge", "verify", str(finished["out"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stderr and "Traceback" not in proc.stderr


def test_good_output_passes_recomputation_of_every_merged_tensor(finished):
    assert verify(str(finished["out"]), plan=str(finished["plan"]), samples=10_000) == []


def test_good_output_passes_verify_plan_through_cli(finished):
    rc, err = run_verify_cli(finished["out"], "--plan", finished["plan"])
    assert rc == 0, err
    assert "OK" in err


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
    rc, err = run_verify_cli(out)
    assert rc == 1
    assert shard.name in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"shardmerge: verify: 1 problem(s) in {out}"


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
    (out / tm.MANIFEST_NAME).unlink()
    only_problem(verify(str(out)), tm.MANIFEST_NAME, "did not finish")


def test_missing_copied_config_file_is_caught(out):
    """The manifest records the base's other files it copied (config, tokenizer); without config.json the
    output no longer loads with transformers, so verify should say so."""
    manifest = json.loads((out / tm.MANIFEST_NAME).read_text())
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
    only_problem(verify(str(out)), tm.INDEX_NAME, MERGED, wrong)


def test_index_with_wrong_total_size_is_caught(out):
    value = index(out)
    value["metadata"]["total_size"] += 2
    write_index(out, value)
    only_problem(verify(str(out)), tm.INDEX_NAME, "total_size")


def test_index_missing_a_tensor_is_caught(out):
    value = index(out)
    del value["weight_map"][MERGED]
    write_index(out, value)
    only_problem(verify(str(out)), tm.INDEX_NAME, MERGED)


def test_missing_index_is_caught(out):
    (out / tm.INDEX_NAME).unlink()
    only_problem(verify(str(out)), tm.INDEX_NAME)


# -- recomputation catches what checksums cannot -----------------------------------------------------------------
def alter_consistently(out: Path, tensors: list[str]) -> None:
    """Change merged values in place (the header stays valid) and re-checksum the shards in the manifest,
    so that only a recomputation from the inputs can tell."""
    import torch

    manifest = json.loads((out / tm.MANIFEST_NAME).read_text())
    for name in tensors:
        shard = shard_of(out, name)
        info = read_header(shard).tensors[name]
        data = bytearray(shard.read_bytes())
        values = torch.frombuffer(data[info.offset : info.offset + info.nbytes], dtype=torch.bfloat16).clone()
        values[: values.numel() // 8] += 0.01  # the first rows, by far more than rounding
        data[info.offset : info.offset + info.nbytes] = values.view(torch.uint8).numpy().tobytes()
        shard.write_bytes(bytes(data))
        manifest["shards"][shard.name]["xxh3_128"] = file_checksum(shard)
    (out / tm.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def test_consistently_altered_tensor_passes_checksums_but_fails_recomputation(out, finished):
    alter_consistently(out, [MERGED])
    assert verify(str(out)) == [], "the alteration should be invisible to the manifest checks"
    rc, err = run_verify_cli(out, "--plan", finished["plan"], "--samples", "1000")
    assert rc == 1
    assert MERGED in err and shard_of(out, MERGED).name in err and "recomputation" in err


def test_default_sample_of_recomputation_catches_altered_merged_tensors(out, finished):
    merged = [t for t in index(out)["weight_map"] if "_proj" in t]
    alter_consistently(out, merged)
    assert verify(str(out)) == []
    problems = verify(str(out), plan=str(finished["plan"]))
    assert problems and all("recomputation" in p for p in problems)


def test_verify_plan_recomputes_a_tensor_four_times_its_budget_within_the_budget(tmp_path):
    import torch
    from synth import lora_pair, write_adapter, write_base, write_plan

    g = torch.Generator().manual_seed(5)
    rows, cols, budget = 8192, 4096, 16 * 2**20  # 64 MiB in bf16 (256 MiB in float64): 4x the budget
    write_base(
        tmp_path / "base",
        {"big.proj.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16), "small.weight": torch.ones(8)},
        shards=2,
    )
    write_adapter(
        tmp_path / "adapter", lora_pair("big.proj", rows, cols, r=8), r=8, lora_alpha=16, target_modules=["proj"]
    )
    plan = write_plan(tmp_path / "plan.yaml", base="base", adapters=["adapter"], output="out", max_memory="256MiB")
    assert subprocess.run([sys.executable, "-m", "shardmerge", str(plan), "-q"]).returncode == 0

    def peak_rss(*args: str) -> tuple[int, int]:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024

    _, idle = peak_rss("-c", "import torch, shardmerge")
    rc, rss = peak_rss(
        "-m", "shardmerge", "verify", str(tmp_path / "out"), "--plan", str(plan), "--max-memory", str(budget)
    )
    assert rc == 0
    assert rss - idle <= budget, f"verify peaked {(rss - idle) / 2**20:.1f} MiB above idle, budget 16 MiB"
