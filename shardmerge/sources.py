"""Finding the inputs: a base model's shards and an adapter's files, on disk or in the Hub cache.

Only headers are read here. Every path that comes from a file we did not write (an index's shard names)
is checked to stay inside the model directory, so a hostile index cannot make us read elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import looks_like_repo_id
from .errors import ShardmergeError
from .safetensors_io import ShardHeader, TensorInfo, read_header
from .stores import location, store_for
from .units import GiB, MiB

INDEX_NAME = "model.safetensors.index.json"
_MAX_JSON = 64 * MiB  # configs and indexes are KBs; a bigger one is hostile or broken
SINGLE_NAME = "model.safetensors"
# Weight formats the output must not carry over from the base: they would shadow or contradict our shards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Metadata first (config, index, tokenizer, generation config, remote code); then only the weight files the
# index names: repos often carry the same weights again (Mistral's consolidated.safetensors, variants in
# sub-folders) and a pattern like *.safetensors would download all of them.
_HUB_BASE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md"]
_LEGACY_LIMIT = 16 * GiB  # a pickled adapter is read whole to be converted
_HUB_ADAPTER_PATTERNS = ["*.safetensors", "*.json", "adapter_model.bin", "*/adapter_model.safetensors"]


@dataclass
class BaseModel:
    directory: Path  # a location in a store (a Path for a local directory)
    shards: list[ShardHeader]  # in file-name order
    tensors: dict[str, TensorInfo]
    has_index: bool
    index_metadata: dict
    other_files: list[Path]
    config: dict = field(default_factory=dict)


def architecture(config: dict) -> str:
    """The model class a config names first in `architectures` ("" when it names none)."""
    architectures = config.get("architectures")
    return (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else ""
    )


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def special_floats(value):
    """A config.json value as transformers reads the file: it stores floats JSON cannot hold as
    {"__float__": "Infinity"} (Nemotron-H's time_step_limit), and its configs refuse them undecoded."""
    if isinstance(value, dict):
        if value.keys() == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {k: special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [special_floats(v) for v in value]
    return value


@dataclass
class AdapterFiles:
    directory: Path
    config: dict
    weights: Path  # adapter_model.safetensors, or a legacy adapter_model.bin
    header: ShardHeader | None  # None until a legacy .bin has been converted


def _json_file(path, what: str) -> dict:
    try:
        raw = store_for(path).read_small(path, _MAX_JSON)
    except OSError as e:
        raise ShardmergeError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(raw) > _MAX_JSON:
        raise ShardmergeError(f"{path}: {what} is larger than 64 MiB; refusing to parse it")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ShardmergeError(f"{path}: {what} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise ShardmergeError(f"{path}: {what} must be a JSON object")
    return value


def resolve_input(spec: str, what: str) -> tuple:
    """(directory, containment root) for a path in a store or a Hub repo id resolved through the local cache.

    The root is the directory that symlinks may point into: the model directory itself, or for the Hub cache
    the repo's cache folder (snapshots link into its blobs/).
    """
    path = location(spec)
    store = store_for(path)
    if store.is_dir(path):
        real = store.real(path)
        return real, real
    if store.stat(path) is not None:
        raise ShardmergeError(f"{spec}: the {what} must be a directory, not a file")
    if looks_like_repo_id(spec):
        return _from_hub(spec, what)
    raise ShardmergeError(f"{spec}: {what} directory not found")


def _from_hub(spec: str, what: str) -> tuple[Path, Path]:
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ShardmergeError(
            f"{spec}: not a local directory, and huggingface_hub is not installed to fetch it "
            "(pip install huggingface_hub)"
        ) from None

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    quiet = _quiet_tqdm() if offline else None  # offline nothing is downloaded: a progress bar is only noise

    def fetch(patterns: list[str], rev: str | None) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=rev, allow_patterns=patterns, tqdm_class=quiet)).resolve()
        except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types; all mean "not available"
            raise ShardmergeError(
                f"{spec}: cannot get the {what} from the Hugging Face Hub: {_hub_hint(e, repo_id)}"
            ) from None

    if what != "base model":
        local = fetch(_HUB_ADAPTER_PATTERNS, revision or None)
    else:
        local = fetch(_HUB_BASE_PATTERNS, revision or None)
        try:
            with open(local / INDEX_NAME, "rb") as f:
                shards = sorted(
                    {
                        s
                        for s in json.load(f)["weight_map"].values()
                        if isinstance(s, str) and not any(c in s for c in "*?[]")
                    }
                )
        except FileNotFoundError:
            shards = [SINGLE_NAME]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = []  # a broken index: read_base names the problem
        if shards:  # the same commit as the metadata (local.name), even if the branch moved meanwhile
            local = fetch(_HUB_BASE_PATTERNS + shards, local.name)
    # .../models--org--name/snapshots/<commit>: links point into .../models--org--name/blobs
    return local, local.parent.parent


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _hub_hint(e: Exception, repo_id: str) -> str:
    name = type(e).__name__
    first = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name == "IncompleteSnapshotError":
        return (
            f"the cached copy is incomplete ({first[:200]}); download it again with network access "
            f"(hf download {repo_id})"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and name == "LocalEntryNotFoundError":
        return (
            "it (or this revision) is not in the local cache and HF_HUB_OFFLINE is set; download it once "
            f"online (hf download {repo_id}) or unset HF_HUB_OFFLINE"
        )
    return f"{name}: {first[:300]}"


def input_identity(path) -> str:
    """What tells one version of an input file from another without reading it (the store's Stat.identity:
    a Hub cache blob's content hash, a local file's device, inode, size and times, an object's ETag or
    version id)."""
    stat = store_for(path).stat(path)
    if stat is None:
        raise ShardmergeError(f"{path}: input file is missing")
    return stat.identity


def _check_inside(root, name: str, directory) -> None:
    """A shard name from the index must stay inside the model directory, links included."""
    if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise ShardmergeError(f"{directory / INDEX_NAME}: shard name {name!r} leaves the model directory")
    try:
        inside = store_for(directory).contains(root, directory / name)
    except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop, name too long
        raise ShardmergeError(f"{directory / INDEX_NAME}: bad shard name {name!r}") from None
    if not inside:
        real = store_for(directory).real(directory / name)
        raise ShardmergeError(f"{directory / name}: links outside the model directory ({real}); refusing to read it")


def read_base(spec: str) -> BaseModel:
    directory, root = resolve_input(spec, "base model")
    store = store_for(directory)
    index_path = directory / INDEX_NAME
    if store.stat(index_path) is not None:
        index = _json_file(index_path, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ShardmergeError(f"{index_path}: index has no weight_map")
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ShardmergeError(f"{index_path}: index metadata must be a JSON object")
        names = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise ShardmergeError(f"{index_path}: tensor {tensor!r} maps to {shard!r}, not a file name")
            names.setdefault(shard, []).append(tensor)
        shard_files = sorted(names)
        has_index = True
    elif store.stat(directory / SINGLE_NAME) is not None:
        shard_files, names, metadata, has_index = [SINGLE_NAME], None, {}, False
    else:
        found = [p.name for p in store.list(directory) if p.suffix in (".safetensors", ".bin")]
        hint = (
            f"found {', '.join(found[:4])} but no {INDEX_NAME}"
            if found
            else "no model.safetensors or model.safetensors.index.json"
        )
        raise ShardmergeError(f"{directory}: not a safetensors model directory ({hint})")

    shards, tensors = [], {}
    for name in shard_files:
        path = directory / name
        _check_inside(root, name, directory)
        try:
            present = store.stat(path) is not None
        except OSError:
            present = False
        if not present:
            where = f"named in {INDEX_NAME}" if names is not None else "model.safetensors"
            raise ShardmergeError(f"{path}: shard {where} is missing or not a file")
        header = read_header(path)
        for tensor in header.tensors.values():
            if tensor.name in tensors:
                raise ShardmergeError(
                    f"{path}: tensor {tensor.name!r} is also stored in {tensors[tensor.name].path.name}"
                )
            tensors[tensor.name] = tensor
        if names is not None:
            for tensor in names[name]:
                if tensor not in header.tensors:
                    raise ShardmergeError(
                        f"{index_path}: tensor {tensor!r} is mapped to {name}, which does not contain it"
                    )
        shards.append(header)
    config_path = directory / "config.json"
    config = _json_file(config_path, "model config") if store.stat(config_path) is not None else {}
    _check_model_types(config, config_path)
    return BaseModel(directory, shards, tensors, has_index, metadata, _other_files(directory, root), config)


def _check_model_types(config: dict, path) -> None:
    """Every model_type in config.json (sub-configs' too) is a name: the model's rules are looked up by it, and
    transformers cannot build a model whose config says otherwise either."""
    for key, value in config.items():
        if key == "model_type" and value is not None and not isinstance(value, str):
            raise ShardmergeError(f"{path}: model_type must be a string such as 'llama', got {value!r}")
        if isinstance(value, dict):
            _check_model_types(value, path)


def _other_files(directory, root) -> list:
    """Config, tokenizer and generation files to copy; weights in other formats are left behind."""
    store = store_for(directory)
    files = []
    for path in store.list(directory):
        if path.name.startswith(".") or path.name == INDEX_NAME or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if store.stat(path) is not None and store.contains(root, path):
            files.append(path)
    return files


def find_adapter(spec: str) -> AdapterFiles:
    directory, root = resolve_input(spec, "adapter")
    store = store_for(directory)
    if store.stat(directory / "adapter_config.json") is None:
        # save_pretrained writes a non-default adapter name into a sub-directory of that name.
        named = [p for p in store.list(directory) if store.stat(p / "adapter_config.json") is not None]
        if len(named) == 1:
            directory = named[0]
        elif named:
            choices = ", ".join(str(p) for p in named)
            raise ShardmergeError(f"{spec}: holds several adapters ({choices}); give one of them as the path")
        else:
            raise ShardmergeError(f"{spec}: no adapter_config.json (not a PEFT adapter directory)")
    config = _json_file(directory / "adapter_config.json", "adapter config")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        weights = directory / name
        if store.stat(weights) is not None:
            if not store.contains(root, weights):
                raise ShardmergeError(f"{weights}: links outside the adapter directory; refusing to read it")
            header = read_header(weights) if name.endswith(".safetensors") else None
            return AdapterFiles(directory, config, weights, header)
    raise ShardmergeError(f"{directory}: no adapter_model.safetensors (or legacy adapter_model.bin)")


def convert_legacy_adapter(adapter: AdapterFiles, scratch_dir: Path) -> AdapterFiles:
    """A pickled adapter_model.bin, read safely (weights_only) and rewritten as safetensors in scratch_dir."""
    import io
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        raw = store_for(adapter.weights).read_small(adapter.weights, _LEGACY_LIMIT)
    except OSError as e:
        raise ShardmergeError(f"{adapter.weights}: cannot read: {e.strerror or e}") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardmergeError(
            f"{adapter.weights}: refused to load this pickle safely (only plain tensors are "
            f"allowed; it may try to run code): {first[:200]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ShardmergeError(f"{adapter.weights}: expected a mapping of tensor names to tensors")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(adapter.weights).encode()).hexdigest()[:16]
    out = scratch_dir / f"legacy-{digest}.safetensors"
    try:  # clone: a state dict may legally hold tied entries sharing storage, which save_file refuses
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out))
    except (TypeError, RuntimeError, ValueError) as e:
        raise ShardmergeError(f"{adapter.weights}: cannot convert: {str(e).strip().splitlines()[0][:200]}") from None
    return AdapterFiles(adapter.directory, adapter.config, out, read_header(out))
