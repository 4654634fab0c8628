"""A resume never mixes two versions of an input. A merge is killed after its first output shard is finished,
then an input file is rewritten in place with other values under the same header (as a re-download of another
revision would leave it); the re-run redoes every shard made from that file, says so naming it, and ends with
exactly the bytes of an uninterrupted merge of the new inputs. The same holds for an already finished output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import models
from helpers.adapters import write_tiny_adapter
from helpers.plans import killed_run, run_cli, write_plan
from safetensors import safe_open

from shardmerge.journal import OutputState


@pytest.fixture
def inputs(tmp_path):
    base = models.write_tiny_base(tmp_path / "base")
    adapter = write_tiny_adapter(tmp_path / "adapter")
    return base, adapter


def _rewrite_in_place(path: Path, factor: float = 1.5) -> None:
    """Every tensor of a safetensors file scaled, written over its old bytes: header, size and inode unchanged."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with open(path, "r+b") as f:
        for name, tensor in tensors.items():
            f.seek(8 + header_len + header[name]["data_offsets"][0])
            f.write((tensor.float() * factor).to(tensor.dtype).contiguous().view(torch.uint8).numpy().tobytes())


def _plan(path: Path, base: Path, adapter: Path, output: Path) -> Path:
    return write_plan(path, base=base, adapters=[adapter], output=output, **models.TINY_OPTIONS)


def _reference(tmp_path: Path, base: Path, adapter: Path) -> dict[str, bytes]:
    """An uninterrupted merge of the inputs as they are now."""
    result = run_cli(_plan(tmp_path / "reference.yaml", base, adapter, tmp_path / "reference"), "-q")
    assert result.returncode == 0, result.stderr
    return models.tree_bytes(tmp_path / "reference")


def _killed_after_first_shard(tmp_path: Path, base: Path, adapter: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    plan = _plan(tmp_path / "plan.yaml", base, adapter, out)
    status = killed_run(plan, OutputState, "journal", 1, after=True)  # the first shard journaled
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert len(list(out.glob("*.safetensors"))) == 1, "one finished shard"
    return plan, out


def _first_base_shard_with_a_finished_twin(base: Path, out: Path) -> Path:
    finished = next(out.glob("*.safetensors")).name
    return base / finished  # output shards keep the base's names: this one was made from that base shard


@pytest.mark.parametrize("which", ["base-shard", "adapter"])
def test_input_rewritten_under_the_same_header_after_a_kill_is_redone_not_kept(tmp_path, inputs, which):
    base, adapter = inputs
    plan, out = _killed_after_first_shard(tmp_path, base, adapter)
    changed = (
        _first_base_shard_with_a_finished_twin(base, out)
        if which == "base-shard"
        else adapter / "adapter_model.safetensors"
    )
    ino = changed.stat().st_ino
    _rewrite_in_place(changed)
    assert changed.stat().st_ino == ino
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    assert str(changed) in result.stderr and "redoing" in result.stderr
    models.assert_same_tree(out, _reference(tmp_path, base, adapter), f"resume after {which} changed")


def test_resume_with_unchanged_inputs_keeps_the_finished_shard(tmp_path, inputs):
    base, adapter = inputs
    plan, out = _killed_after_first_shard(tmp_path, base, adapter)
    finished = next(out.glob("*.safetensors"))
    ino = finished.stat().st_ino
    result = run_cli(plan, "-q")
    assert result.returncode == 0 and "redoing" not in result.stderr, result.stderr
    assert finished.stat().st_ino == ino, "the finished shard was kept, not rewritten"


def test_finished_output_is_redone_where_an_input_changed_since(tmp_path, inputs):
    base, adapter = inputs
    out = tmp_path / "out"
    plan = _plan(tmp_path / "plan.yaml", base, adapter, out)
    assert run_cli(plan, "-q").returncode == 0
    replaced = base / models.shard_name(2)
    shutil.copyfile(replaced, tmp_path / "copy")
    _rewrite_in_place(tmp_path / "copy", 0.5)
    os.replace(tmp_path / "copy", replaced)  # a re-download: a new file under the old name
    result = run_cli(plan, "-q")
    assert result.returncode == 0 and str(replaced) in result.stderr, result.stderr
    models.assert_same_tree(out, _reference(tmp_path, base, adapter), "re-run after the base changed")
