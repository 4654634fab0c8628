"""Directory-level hostile and broken inputs: read_base, find_adapter, convert_legacy_adapter.

Each case is refused with a ShardmergeError whose message names the offending file or tensor (or, for the
legitimate layouts, accepted), and nothing here ever reads outside the directory it was given or runs code
from a pickle.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from helpers.adapters import write_adapter
from helpers.models import write_model
from safetensors.torch import save_file

from shardmerge.errors import ShardmergeError
from shardmerge.sources import INDEX_NAME, convert_legacy_adapter, find_adapter, read_base

# --------------------------------------------------------------------------------------------- builders


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_index(directory: Path, weight_map: dict, metadata=None) -> Path:
    path = directory / INDEX_NAME
    path.write_text(json.dumps({"metadata": metadata or {"total_size": 0}, "weight_map": weight_map}))
    return path


def sharded_model(directory: Path) -> Path:
    """A valid two-shard model: a, b in shard 1; c in shard 2."""
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4), "c": torch.arange(6.0)}
    return write_model(directory, tensors, shards=[["a", "b"], ["c"]])


def refused(fn, *args, names: tuple[str, ...]) -> str:
    with pytest.raises(ShardmergeError) as info:
        fn(*args)
    message = str(info.value)
    for name in names:
        assert name in message, message
    return message


def adapter_dir(directory: Path, tensors: dict[str, torch.Tensor] | None = None, legacy=False) -> Path:
    """A LoRA (r=2) on q_proj; `legacy`: its weights in a pickled adapter_model.bin instead."""
    if tensors is None:
        tensors = {
            "base_model.model.q_proj.lora_A.weight": torch.randn(2, 3),
            "base_model.model.q_proj.lora_B.weight": torch.randn(3, 2),
        }
    return write_adapter(directory, tensors, legacy=legacy, r=2, lora_alpha=4)


# ----------------------------------------------------------------------------------- base: the good cases


def test_valid_sharded_model_reads(tmp_path):
    base = read_base(str(sharded_model(tmp_path / "m")))
    assert base.has_index
    assert set(base.tensors) == {"a", "b", "c"}
    assert base.tensors["c"].path.name == "model-00002-of-00002.safetensors"
    assert [p.name for p in base.other_files] == ["config.json"]


def test_single_file_model_reads(tmp_path):
    d = tmp_path / "single"
    write_shard(d / "model.safetensors", {"w": torch.ones(3)})
    base = read_base(str(d))
    assert not base.has_index and set(base.tensors) == {"w"}


def test_shard_symlinked_within_the_model_dir_is_accepted(tmp_path):
    d = sharded_model(tmp_path / "m")
    (d / "store").mkdir()
    os.rename(d / "model-00002-of-00002.safetensors", d / "store" / "blob")
    os.symlink("store/blob", d / "model-00002-of-00002.safetensors")
    assert set(read_base(str(d)).tensors) == {"a", "b", "c"}


# ------------------------------------------------------------------------------------ base: the refusals


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    os.remove(d / "model-00002-of-00002.safetensors")
    refused(read_base, str(d), names=("model-00002-of-00002.safetensors",))


def test_index_naming_a_tensor_the_shard_lacks_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    write_index(
        d,
        {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
            "ghost": "model-00002-of-00002.safetensors",
        },
    )
    refused(read_base, str(d), names=("ghost", "model-00002-of-00002.safetensors"))


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    write_index(
        d,
        {
            "a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    )
    refused(read_base, str(d), names=("'a'", "model-00002-of-00002.safetensors"))


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "sub/../../outside.safetensors", "..", "sub/../model-00001-of-00002.safetensors"]
)
def test_shard_name_with_dotdot_is_refused(tmp_path, name):
    d = sharded_model(tmp_path / "m")
    write_shard(tmp_path / "outside.safetensors", {"a": torch.ones(2, 3)})
    write_index(d, {"a": name})
    refused(read_base, str(d), names=(INDEX_NAME, repr(name)))


def test_absolute_shard_name_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    outside = tmp_path / "outside.safetensors"
    write_shard(outside, {"a": torch.ones(2, 3)})
    write_index(d, {"a": str(outside)})
    refused(read_base, str(d), names=(INDEX_NAME, str(outside)))


def test_absolute_shard_name_pointing_inside_the_dir_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    inside = str(d / "model-00001-of-00002.safetensors")
    write_index(d, {"a": inside, "b": inside})
    refused(read_base, str(d), names=(inside,))


def test_backslash_shard_name_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    write_index(d, {"a": "..\\outside.safetensors"})
    refused(read_base, str(d), names=(INDEX_NAME,))


def test_shard_symlinked_outside_the_model_dir_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    outside = tmp_path / "secret.safetensors"
    write_shard(outside, {"c": torch.arange(6.0)})
    os.remove(d / "model-00002-of-00002.safetensors")
    os.symlink(outside, d / "model-00002-of-00002.safetensors")
    refused(read_base, str(d), names=("model-00002-of-00002.safetensors",))


def test_single_model_file_symlinked_outside_is_refused(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    outside = tmp_path / "secret.safetensors"
    write_shard(outside, {"w": torch.ones(3)})
    os.symlink(outside, d / "model.safetensors")
    refused(read_base, str(d), names=("model.safetensors",))


def test_shard_in_a_subdirectory_symlinked_outside_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    write_shard(tmp_path / "elsewhere" / "s.safetensors", {"a": torch.ones(2, 3)})
    os.symlink(tmp_path / "elsewhere", d / "sub")
    write_index(d, {"a": "sub/s.safetensors"})
    refused(read_base, str(d), names=("s.safetensors",))


def test_shard_that_is_a_symlink_loop_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    os.symlink(d / "loop.safetensors", d / "loop.safetensors")
    write_index(d, {"a": "loop.safetensors"})
    refused(read_base, str(d), names=("loop.safetensors",))


def test_shard_that_is_a_directory_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    (d / "dir.safetensors").mkdir()
    write_index(d, {"a": "dir.safetensors"})
    refused(read_base, str(d), names=("dir.safetensors",))


def test_duplicate_tensor_across_two_shards_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    write_shard(d / "model-00002-of-00002.safetensors", {"c": torch.arange(6.0), "a": torch.ones(2, 3)})
    refused(read_base, str(d), names=("'a'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))


def test_corrupt_shard_header_is_refused_naming_the_shard(tmp_path):
    d = sharded_model(tmp_path / "m")
    path = d / "model-00002-of-00002.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    refused(read_base, str(d), names=("model-00002-of-00002.safetensors",))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"weight_map": {}}',
        '{"weight_map": []}',
        '{"metadata": {}}',
        '{"weight_map": {"a": 3}}',
        '{"weight_map": {"a": null}}',
        '{"weight_map": {"a": ""}}',
        '{"weight_map": {"a": ["x"]}}',
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}, "metadata": "x"}',
    ],
)
def test_malformed_index_is_refused_naming_it(tmp_path, text):
    d = sharded_model(tmp_path / "m")
    (d / INDEX_NAME).write_text(text)
    refused(read_base, str(d), names=(INDEX_NAME,))


def test_index_that_is_not_utf8_is_refused(tmp_path):
    d = sharded_model(tmp_path / "m")
    (d / INDEX_NAME).write_bytes(b'{"weight_map": {"\xff": "x"}}')
    refused(read_base, str(d), names=(INDEX_NAME,))


def test_no_safetensors_only_pytorch_model_bin_is_refused(tmp_path):
    d = tmp_path / "legacy-model"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    refused(read_base, str(d), names=("legacy-model", "pytorch_model.bin"))


def test_empty_directory_is_refused(tmp_path):
    d = tmp_path / "nothing-here"
    d.mkdir()
    refused(read_base, str(d), names=("nothing-here",))


def test_base_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_shard(path, {"w": torch.ones(1)})
    refused(read_base, str(path), names=("model.safetensors",))


def test_missing_base_directory_is_refused(tmp_path):
    refused(read_base, str(tmp_path / "no-such-model"), names=("no-such-model",))


def test_malformed_config_json_is_refused_naming_it(tmp_path):
    d = sharded_model(tmp_path / "m")
    (d / "config.json").write_text("{oops")
    refused(read_base, str(d), names=("config.json",))


@pytest.mark.parametrize(
    "config", [{"model_type": ["llama"]}, {"model_type": "llava", "text_config": {"model_type": 7}}]
)
def test_config_json_whose_model_type_is_not_a_name_is_refused_naming_it(tmp_path, config):
    d = sharded_model(tmp_path / "m")
    (d / "config.json").write_text(json.dumps(config))
    refused(read_base, str(d), names=("config.json", "model_type"))


# ---------------------------------------------------------------------------------------------- adapters


def test_adapter_dir_with_one_named_sub_adapter_is_found(tmp_path):
    root = tmp_path / "adapters"
    adapter_dir(root / "my-task")
    found = find_adapter(str(root))
    assert found.directory.name == "my-task"
    assert found.weights.name == "adapter_model.safetensors"
    assert set(found.header.tensors) == {
        "base_model.model.q_proj.lora_A.weight",
        "base_model.model.q_proj.lora_B.weight",
    }


def test_adapter_dir_with_two_named_sub_adapters_lists_them(tmp_path):
    root = tmp_path / "adapters"
    adapter_dir(root / "task-one")
    adapter_dir(root / "task-two")
    refused(find_adapter, str(root), names=("task-one", "task-two"))


def test_adapter_dir_without_config_is_refused(tmp_path):
    d = tmp_path / "not-an-adapter"
    d.mkdir()
    save_file({"x": torch.ones(1)}, str(d / "adapter_model.safetensors"))
    refused(find_adapter, str(d), names=("not-an-adapter",))


def test_adapter_dir_without_weights_is_refused(tmp_path):
    d = tmp_path / "weightless"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    refused(find_adapter, str(d), names=("weightless",))


def test_adapter_weights_symlinked_outside_are_refused(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.ones(1)}, str(outside))
    os.symlink(outside, d / "adapter_model.safetensors")
    refused(find_adapter, str(d), names=("adapter_model.safetensors",))


def test_adapter_config_that_is_not_json_is_refused(tmp_path):
    d = adapter_dir(tmp_path / "adapter")
    (d / "adapter_config.json").write_text("r: 8")
    refused(find_adapter, str(d), names=("adapter_config.json",))


def test_adapter_with_corrupt_safetensors_is_refused(tmp_path):
    d = adapter_dir(tmp_path / "adapter")
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    refused(find_adapter, str(d), names=("adapter_model.safetensors",))


# --------------------------------------------------------------------------------- legacy adapter_model.bin


def test_benign_legacy_adapter_converts_and_lists_its_tensors(tmp_path):
    tensors = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(2, 3),
        "base_model.model.q_proj.lora_B.weight": torch.randn(3, 2).to(torch.bfloat16),
        "base_model.model.v_proj.lora_A.weight": torch.randn(4, 3).t(),  # non-contiguous
    }
    d = adapter_dir(tmp_path / "legacy", tensors, legacy=True)
    found = find_adapter(str(d))
    assert found.weights.name == "adapter_model.bin" and found.header is None
    converted = convert_legacy_adapter(found, tmp_path / "scratch")
    assert converted.weights.parent == tmp_path / "scratch"
    assert set(converted.header.tensors) == set(tensors)
    assert converted.header.tensors["base_model.model.q_proj.lora_B.weight"].dtype == "BF16"
    assert converted.header.tensors["base_model.model.v_proj.lora_A.weight"].shape == (3, 4)
    from safetensors import safe_open

    with safe_open(str(converted.weights), framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name


class _RunsCode:
    """Pickles as a call to `func(arg)`: loading it unsafely runs the call."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _payloads(marker: Path):
    return {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": _RunsCode(exec, f"with open({str(marker)!r}, 'w') as f: f.write('pwned')"),
        "builtins.eval": _RunsCode(eval, f"open({str(marker)!r}, 'w').close()"),
    }


def _write_malicious(path: Path, payload, fmt: str) -> None:
    obj = {"base_model.model.q_proj.lora_A.weight": torch.ones(2, 2), "x": payload}
    if fmt == "torch.save":
        torch.save(obj, path)  # the zip container torch.load expects
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))  # a bare legacy pickle


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
def test_malicious_pickle_adapter_is_refused_without_running_code(tmp_path, kind, fmt):
    marker = tmp_path / "PWNED"
    d = adapter_dir(tmp_path / "evil", legacy=True)
    _write_malicious(d / "adapter_model.bin", _payloads(marker)[kind], fmt)
    found = find_adapter(str(d))
    refused(convert_legacy_adapter, found, tmp_path / "scratch", names=("adapter_model.bin",))
    assert not marker.exists(), "loading the adapter ran code from the pickle"
    assert not list((tmp_path / "scratch").glob("*.safetensors")) if (tmp_path / "scratch").exists() else True


def test_malicious_pickle_payload_is_live(tmp_path):
    # Control for the test above: the same file, loaded unsafely, does run its payload, so the refusal there
    # is what kept the marker from appearing.
    marker = tmp_path / "PWNED"
    path = tmp_path / "adapter_model.bin"
    _write_malicious(path, _payloads(marker)["builtins.exec"], "torch.save")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x04", b"not a pickle at all", b"PK\x03\x04garbage-zip"])
def test_corrupt_legacy_adapter_is_refused(tmp_path, content):
    d = adapter_dir(tmp_path / "broken", legacy=True)
    (d / "adapter_model.bin").write_bytes(content)
    refused(convert_legacy_adapter, find_adapter(str(d)), tmp_path / "scratch", names=("adapter_model.bin",))


@pytest.mark.parametrize("obj", [[torch.ones(2)], torch.ones(2), {"a": {"b": torch.ones(2)}}, {"a": 1.0}, None])
def test_legacy_adapter_that_is_not_a_dict_of_tensors_is_refused(tmp_path, obj):
    d = adapter_dir(tmp_path / "odd", legacy=True)
    torch.save(obj, d / "adapter_model.bin")
    refused(convert_legacy_adapter, find_adapter(str(d)), tmp_path / "scratch", names=("adapter_model.bin",))


def test_legacy_adapter_with_non_string_keys_is_refused(tmp_path):
    d = adapter_dir(tmp_path / "intkeys", legacy=True)
    torch.save({1: torch.ones(2)}, d / "adapter_model.bin")
    refused(convert_legacy_adapter, find_adapter(str(d)), tmp_path / "scratch", names=("adapter_model.bin",))


def test_legacy_adapter_with_sparse_tensor_is_refused(tmp_path):
    d = adapter_dir(tmp_path / "sparse", legacy=True)
    torch.save({"a": torch.eye(3).to_sparse()}, d / "adapter_model.bin")
    refused(convert_legacy_adapter, find_adapter(str(d)), tmp_path / "scratch", names=("adapter_model.bin",))


@pytest.mark.parametrize("share", ["same-tensor", "view"])
def test_legacy_adapter_with_tensors_sharing_storage_converts_or_is_refused(tmp_path, share):
    # Tied entries (one storage under two names) are legal in a torch.save'd state dict; safetensors.save_file
    # refuses them with a RuntimeError. Either convert (copying) or refuse naming the file; never a raw error.
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "b": base if share == "same-tensor" else base[1]}
    d = adapter_dir(tmp_path / "tied", legacy=True)
    torch.save(tensors, d / "adapter_model.bin")
    try:
        converted = convert_legacy_adapter(find_adapter(str(d)), tmp_path / "scratch")
    except ShardmergeError as e:
        assert "adapter_model.bin" in str(e)
        return
    from safetensors import safe_open

    with safe_open(str(converted.weights), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), tensors["a"]) and torch.equal(f.get_tensor("b"), tensors["b"])
