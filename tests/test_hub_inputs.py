"""Hub repo ids as inputs: `base: org/name`, `path: org/adapter`, `org/name@revision`, resolved offline from a
huggingface_hub cache fabricated on disk in the exact layout huggingface_hub writes:

    HF_HUB_CACHE/models--org--name/
        blobs/<sha>                         file contents, named by hash
        refs/main                           the commit hash main points at (no newline)
        snapshots/<commit>/<file>           relative symlinks into ../../blobs
        trees/<commit>.json                 the repo's file listing (huggingface_hub >= 2.x keeps it to
                                            tell a complete snapshot from a partial one)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers.adapters import write_adapter
from helpers.models import tree_bytes
from helpers.plans import run_cli, write_plan
from safetensors.torch import load_file

import shardmerge
from shardmerge.demo import write_demo
from shardmerge.sources import _HUB_ADAPTER_PATTERNS, _HUB_BASE_PATTERNS

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAIN = "a" * 40
OLD = "b" * 40
ADAPTER_MAIN = "c" * 40
ADAPTER_V0 = "d" * 40
MANIFEST = "shardmerge-manifest.json"
TOKENIZER = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"model_max_length": 128}',
    "special_tokens_map.json": b'{"bos_token": "<s>"}',
    "generation_config.json": b'{"do_sample": false}',
}
# In the repo's listing but never fetched by shardmerge: weights in other formats, training leftovers.
NOT_FETCHED = {
    "pytorch_model.bin": b"\x80\x02pickled weights",
    "flax_model.msgpack": b"msgpack",
    "original/consolidated.00.pth": b"pth",
    "training_args.bin": b"args",
}


def fake_repo(
    cache: Path,
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    refs: tuple[str, ...] = ("main",),
    listed_only: dict[str, bytes] | None = None,
) -> Path:
    """One commit of a repo in the cache, as snapshot_download leaves it; returns the snapshot folder.

    `listed_only` files are in the repo (its tree listing) but were never downloaded into this snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    listing = {}
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()  # LFS blobs are named by sha256, small files by git sha1
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[rel] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    for rel, data in (listed_only or {}).items():
        listing[rel] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # exactly the hash: huggingface_hub reads it verbatim
    (repo / "trees").mkdir(parents=True, exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local copies of a base and two adapter revisions, and the same files as cached Hub repos."""
    tmp = tmp_path_factory.mktemp("hub")
    write_demo(tmp)
    local_base, local_adapter = tmp / "base", tmp / "adapter"
    for name, data in {**TOKENIZER, "pytorch_model.bin": NOT_FETCHED["pytorch_model.bin"]}.items():
        (local_base / name).write_bytes(data)  # the local dir has the same stray .bin as the cached snapshot
    # A second adapter revision: same keys, B doubled.
    tensors = load_file(str(local_adapter / "adapter_model.safetensors"))
    doubled = {k: (v * 2 if ".lora_B." in k else v) for k, v in tensors.items()}
    v0 = write_adapter(tmp / "adapter-v0", doubled, **json.loads((local_adapter / "adapter_config.json").read_text()))

    cache = tmp / "hub"
    base_files = tree_bytes(local_base)
    fake_repo(
        cache,
        "org/name",
        MAIN,
        base_files,
        refs=("main",),
        listed_only={k: v for k, v in NOT_FETCHED.items() if k != "pytorch_model.bin"},
    )
    old = dict(base_files, **{"config.json": base_files["config.json"].replace(b'"llama"', b'"llama" ')})
    fake_repo(cache, "org/name", OLD, old, refs=("v1.0",))
    fake_repo(
        cache,
        "org/adapter",
        ADAPTER_MAIN,
        {**tree_bytes(local_adapter), "README.md": b"# adapter\n"},
        listed_only={"training_args.bin": NOT_FETCHED["training_args.bin"], "checkpoint-10/optimizer.pt": b"opt"},
    )
    fake_repo(cache, "org/adapter", ADAPTER_V0, tree_bytes(v0), refs=("v0",))
    # A repo whose listing names a shard the cache does not have: an interrupted download.
    partial = dict(base_files)
    missing = partial.pop("model-00002-of-00003.safetensors")
    fake_repo(cache, "org/partial", MAIN, partial, listed_only={"model-00002-of-00003.safetensors": missing})
    return {"tmp": tmp, "cache": cache, "base": local_base, "adapter": local_adapter, "adapter_v0": v0}


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=our cache, for this process (huggingface_hub reads both at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub["cache"]))
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    return hub


def _merge(tmp: Path, name: str, base: str, adapter: str) -> Path:
    out = tmp / name
    plan = write_plan(
        tmp / f"{name}.yaml", base=base, adapters=[{"path": adapter}], output=out, device="cpu", max_memory="64MiB"
    )
    shardmerge.merge(plan)
    return out


def _assert_same_output(actual: Path, expected: Path) -> None:
    got, want = tree_bytes(actual), tree_bytes(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        if name != MANIFEST:  # the manifest records where the inputs were (cache snapshot vs local dir)
            assert got[name] == want[name], name

    def checksums(manifest: bytes) -> dict:  # the input identities differ: Hub blobs are named by their hash
        return {name: (e["size"], e["xxh3_128"]) for name, e in json.loads(manifest)["shards"].items()}

    assert checksums(got[MANIFEST]) == checksums(want[MANIFEST])


# -- the fabricated cache is what huggingface_hub itself resolves --------------------------------------------
def test_snapshot_download_resolves_the_fabricated_cache_offline(offline):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = offline["cache"]
    folder = Path(snapshot_download("org/name", allow_patterns=_HUB_BASE_PATTERNS))
    assert folder == cache / "models--org--name" / "snapshots" / MAIN
    assert (folder / "model-00001-of-00003.safetensors").resolve().parent.name == "blobs"
    assert Path(snapshot_download("org/name", revision="v1.0")).name == OLD  # a tag, through refs/
    assert Path(snapshot_download("org/name", revision=OLD)).name == OLD  # a commit, straight to snapshots/
    assert Path(snapshot_download("org/adapter", allow_patterns=_HUB_ADAPTER_PATTERNS)).name == ADAPTER_MAIN
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("org/not-cached")
    # The listing has weights in other formats that were never downloaded: with shardmerge's patterns they are
    # not asked for, so the snapshot counts as complete; asking for everything would call it incomplete.
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download("org/name")
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download("org/adapter")


def test_patterns_fetch_weights_config_and_tokenizer_only():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        *NOT_FETCHED,
    ]
    # The shard names the index lists are asked for by name (or, in older versions, by *.safetensors).
    fetched = set(filter_repo_objects(repo, allow_patterns=_HUB_BASE_PATTERNS + ["model-00001-of-00002.safetensors"]))
    assert fetched == set(repo) - set(NOT_FETCHED)
    adapter = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_args.bin",
        "optimizer.pt",
        "checkpoint-10/optimizer.pt",
        "rng_state.pth",
    ]
    assert set(filter_repo_objects(adapter, allow_patterns=_HUB_ADAPTER_PATTERNS)) == {
        "adapter_model.safetensors",
        "adapter_config.json",
    }


# -- merging from the cache ----------------------------------------------------------------------------------
def test_repo_ids_merge_like_local_paths(offline, tmp_path):
    local = _merge(tmp_path, "local", str(offline["base"]), str(offline["adapter"]))
    from_hub = _merge(tmp_path, "hub", "org/name", "org/adapter")
    _assert_same_output(from_hub, local)
    names = set(tree_bytes(from_hub))
    assert set(TOKENIZER) <= names  # tokenizer and generation config come along
    assert not any(n.endswith((".bin", ".msgpack", ".pth")) for n in names)  # the cached pytorch_model.bin does not
    assert "README.md" not in names  # the adapter repo's files are not the model's
    manifest = json.loads((from_hub / MANIFEST).read_text())
    assert manifest["base"].endswith(f"models--org--name/snapshots/{MAIN}")


@pytest.mark.xfail(
    "*.safetensors" in _HUB_BASE_PATTERNS,
    strict=True,
    reason="sources._from_hub asks for every *.safetensors, not just the shards the index names",
)
def test_cache_with_only_the_indexed_shards_merges_offline(offline, tmp_path):
    """Repos often hold the weights twice (Mistral's consolidated.safetensors next to the shards). A cache filled
    with only what the index names (`hf download org/name --include "*.json" "model-*"`) is complete for us."""
    files = tree_bytes(offline["base"])
    fake_repo(
        offline["cache"],
        "org/twice",
        MAIN,
        files,
        listed_only={"consolidated.safetensors": b"x" * 64, "variant/model.safetensors": b"y" * 64},
    )
    local = _merge(tmp_path, "local", str(offline["base"]), str(offline["adapter"]))
    _assert_same_output(_merge(tmp_path, "twice", "org/twice", "org/adapter"), local)


def test_repo_id_at_revision(offline, tmp_path):
    expected = _merge(tmp_path, "local-v0", str(offline["base"]), str(offline["adapter_v0"]))
    by_tag = _merge(tmp_path, "tag", "org/name", "org/adapter@v0")
    by_commit = _merge(tmp_path, "commit", "org/name", f"org/adapter@{ADAPTER_V0}")
    _assert_same_output(by_tag, expected)
    _assert_same_output(by_commit, expected)
    main_rev = _merge(tmp_path, "main", "org/name", "org/adapter@main")
    assert (
        tree_bytes(main_rev)["model-00001-of-00003.safetensors"]
        != tree_bytes(by_tag)["model-00001-of-00003.safetensors"]
    )
    old_base = _merge(tmp_path, "old-base", "org/name@v1.0", "org/adapter")
    assert tree_bytes(old_base)["config.json"] != tree_bytes(main_rev)["config.json"]


def test_uncached_repo_is_one_line_error_naming_it(offline, tmp_path):
    for base, adapter, needle in (
        ("org/not-cached", "org/adapter", "org/not-cached"),
        ("org/name", "org/no-adapter@v9", "org/no-adapter@v9"),
        ("org/name@nope", "org/adapter", "org/name@nope"),
    ):
        plan = write_plan(
            tmp_path / "plan.yaml", base=base, adapters=[{"path": adapter}], output=tmp_path / "o", device="cpu"
        )
        result = run_cli(plan, "-q")
        assert result.returncode != 0
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "HF_HUB_OFFLINE" in err[0], err
        assert not (tmp_path / "o").exists()


def test_incomplete_cached_snapshot_is_one_line_error(offline, tmp_path):
    plan = write_plan(
        tmp_path / "plan.yaml",
        base="org/partial",
        adapters=[{"path": "org/adapter"}],
        output=tmp_path / "o",
        device="cpu",
    )
    result = run_cli(plan, "-q")
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "org/partial" in err[0], err
    assert not (tmp_path / "o").exists()


# -- end to end through the environment, as a user runs it ---------------------------------------------------
def test_cli_with_hf_environment_variables(hub, tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(hub["cache"]),
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    adapters = [{"path": "org/adapter", "weight": 1.0}]
    plan = write_plan(
        tmp_path / "plan.yaml", base="org/name", adapters=adapters, output="out", device="cpu", max_memory="64MiB"
    )
    result = run_cli(plan, "-q", process=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / MANIFEST).is_file() and not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == TOKENIZER["tokenizer.json"]
    write_plan(plan, base="org/missing", adapters=[{"path": "org/adapter"}], output="out2")
    result = run_cli(plan, process=True, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/missing" in lines[0], result.stderr
