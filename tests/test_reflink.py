"""Extent sharing: on XFS with reflink a kept-layout output shares the base's blocks for every untouched tensor,
so the filesystem grows by about the merged tensors only, and the bytes are those of a run anywhere else."""

import os
import shutil
import subprocess

import pytest
import torch
from helpers.adapters import lora_pair, q_proj_case, write_adapter
from helpers.models import write_model

import shardmerge

MiB = 2**20


@pytest.fixture
def xfs(tmp_path):
    """A loop-mounted XFS image with reflink; skipped where this process cannot make or mount one."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None or shutil.which("mount") is None:
        pytest.skip("needs root and mkfs.xfs to loop-mount an XFS image")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as f:
        f.truncate(1024 * MiB)
    mount.mkdir()
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True)
    if (
        made.returncode != 0
        or subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True).returncode != 0
    ):
        pytest.skip("cannot loop-mount an XFS image here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def used_bytes(path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def attention_model(directory, layers: int = 8, hidden: int = 1024, mlp: int = 2816):
    """A Llama-like base (bf16, ~110 MiB in 3 shards) and a LoRA on q_proj and v_proj only."""
    g = torch.Generator().manual_seed(0)
    tensors, adapter = {"model.embed_tokens.weight": torch.randn(3000, hidden, generator=g).to(torch.bfloat16)}, {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden // 4, hidden)),
            ("self_attn.v_proj", (hidden // 4, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.up_proj", (mlp, hidden)),
            ("mlp.down_proj", (hidden, mlp)),
        ]:
            tensors[p + name + ".weight"] = torch.randn(*shape, generator=g).to(torch.bfloat16)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        for proj, out in (("q_proj", hidden), ("v_proj", hidden // 4)):
            adapter.update(lora_pair(p + "self_attn." + proj, out, hidden, r=8, seed=i))
    write_model(directory / "base", tensors, shards=3)
    write_adapter(directory / "adapter", adapter, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    merged = sum(t.numel() * 2 for n, t in tensors.items() if "q_proj" in n or "v_proj" in n)
    return sum(t.numel() * 2 for t in tensors.values()), merged


def test_reflink_output_grows_the_filesystem_by_the_merged_tensors_only_and_matches_ext4(xfs, tmp_path):
    total, merged = attention_model(xfs)
    plan = {"base": str(xfs / "base"), "adapters": [str(xfs / "adapter")], "max_memory": "64MiB", "device": "cpu"}
    before = used_bytes(xfs)
    shardmerge.merge({**plan, "output": str(xfs / "out")})
    growth = used_bytes(xfs) - before

    assert total > 4 * merged  # a full copy would blow the bound below
    assert growth <= 1.15 * merged + 64 * MiB, f"grew {growth / MiB:.0f} MiB for {merged / MiB:.0f} MiB merged"
    shardmerge.merge({**plan, "output": str(tmp_path / "elsewhere")})
    for shard in (tmp_path / "elsewhere").glob("*.safetensors"):
        assert (xfs / "out" / shard.name).read_bytes() == shard.read_bytes()


def pad_header(path, data_start: int) -> None:
    """Rewrite a safetensors file with its header padded by spaces so its data starts at `data_start`."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip(b" ")
    header += b" " * (data_start - 8 - len(header))
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


def test_kept_layout_keeps_each_base_shards_data_start_and_resharding_does_not(tmp_path):
    from shardmerge.safetensors_io import read_header

    base, adapter = q_proj_case(tmp_path)
    shards = sorted(base.glob("*.safetensors"))
    pad_header(shards[0], 4096 + 64)
    plan = {"base": str(base), "adapters": [str(adapter)], "device": "cpu"}
    shardmerge.merge({**plan, "output": str(tmp_path / "kept")})
    for shard in shards:
        assert read_header(tmp_path / "kept" / shard.name).data_start == read_header(shard).data_start
    shardmerge.merge({**plan, "output": str(tmp_path / "resharded"), "max_shard_size": "1GB"})
    assert read_header(tmp_path / "resharded" / "model.safetensors").data_start < 4096
