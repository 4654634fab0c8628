"""Models on disk: the one safetensors checkpoint writer, the tiny Llama many tests share, random transformers
models saved by save_pretrained, reading checkpoints back, and byte snapshots of directory trees.

Everything is deterministic (fixed seeds) and tiny; nothing is downloaded: models come from configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from shardmerge.demo import INDEX_NAME, SINGLE_NAME, TinyLlama, round_robin, write_checkpoint

MANIFEST_NAME = "shardmerge-manifest.json"
STATE_DIR = ".shardmerge"

# The crash-safety/verify model: a small `max_memory` tiles every projection into several row blocks across
# 7 shards (about 100 tile writes), which gives fault-injection tests many distinct, reproducible points to
# stop at; about 1.4 MB, so a whole merge takes well under a second.
TINY = TinyLlama(hidden=128, intermediate=256, layers=4, vocab=512, rank=8, shards=7)
MAX_MEMORY = "16512KiB"  # 16 MiB of fixed run overhead + 128 KiB of buffers: every projection in 2-5 row blocks
TINY_OPTIONS = {"device": "cpu", "max_memory": MAX_MEMORY}  # the plan options a merge of TINY runs with


def write_model(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    shards: int | list[list[str]] = 2,
    config: dict | None = None,
    files: dict[str, dict] | None = None,
) -> Path:
    """`tensors` as a checkpoint: dealt round-robin by name over `shards` files (1: model.safetensors, no
    index), or grouped as the lists of names in `shards` say; config.json (default: a bare llama) and
    `files` (name -> JSON content) beside them."""
    groups = (
        round_robin(tensors, shards)
        if isinstance(shards, int)
        else [{name: tensors[name] for name in group} for group in shards]
    )
    write_checkpoint(Path(directory), groups, config or {"model_type": "llama"})
    for name, content in (files or {}).items():
        (Path(directory) / name).write_text(json.dumps(content))
    return Path(directory)


def shard_name(i: int, n: int = TINY.shards) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_tiny_base(directory: Path, shards: int = TINY.shards, seed: int = 0) -> Path:
    """TINY in bf16 (noisy layer norms) over `shards` files, with generation and tokenizer configs beside it."""
    tensors = TINY.base_tensors(torch.Generator().manual_seed(seed), noisy_norms=True)
    files = {"generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
             "tokenizer_config.json": {"model_max_length": 128}}  # fmt: skip
    return write_model(directory, tensors, shards, TINY.config(), files)


def add_tensor(directory: Path, name: str, tensor: torch.Tensor, beside: str) -> Path:
    """`tensor` stored under `name` too, in the shard (and index entry) of the stored tensor `beside`."""
    from safetensors.torch import load_file, save_file

    index = json.loads((directory / INDEX_NAME).read_text())
    shard = index["weight_map"][beside]
    save_file({**load_file(str(directory / shard)), name: tensor}, str(directory / shard), metadata={"format": "pt"})
    index["weight_map"][name] = shard
    (directory / INDEX_NAME).write_text(json.dumps(index))
    return directory


# -- random transformers models -----------------------------------------------------------------------------
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, MAX_POS = 128, 32, 64, 2, 4, 2, 64
LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quiet():
    """Silence the chatty but harmless warnings transformers and PEFT print for tiny random models."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001  # pragma: no cover - logging knobs are best effort
        pass


def tiny_config(arch: str, *, tie: bool = False):
    """A tiny config (hidden 32, 2 layers, vocab 128) for one architecture.

    arch: "llama" (no biases), "llama_bias" (Llama with attention_bias=True: q/k/v/o biases),
    "qwen2" (q/k/v biases, no o bias), "phi3" (fused qkv_proj and gate_up_proj), "gpt2" (Conv1D layers,
    fan_in_fan_out weights stored (in, out)). `tie` sets tie_word_embeddings (GPT-2 is always tied).
    """
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama_bias":
        return LlamaConfig(attention_bias=True, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POS,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown arch {arch!r}")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values, independent of transformers' init code.

    Matrices ~ N(0, 0.05^2); biases ~ N(0, 0.05^2) (so "the base bias is untouched" is a real check);
    norm weights ~ 1 + N(0, 0.1^2). Tied parameters are visited once.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 or name.endswith("bias"):
                p.copy_(noise * 0.05)
            else:
                p.copy_(1.0 + 0.1 * noise)


def random_model(config, seed: int = 0, auto_class=None) -> torch.nn.Module:
    """A float32 model built from `config` (an AutoModelForCausalLM unless `auto_class`), randomized."""
    quiet()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = (auto_class or AutoModelForCausalLM).from_config(config, dtype=torch.float32)
    randomize(model, seed)
    return model


def build_base(
    out_dir: str | os.PathLike,
    arch="llama",
    dtype: torch.dtype = torch.bfloat16,
    *,
    tie: bool = False,
    seed: int = 0,
    max_shard_size: str = "20KB",
    auto_class=None,
    hub_layout: bool = False,
    min_shards: int = 2,
) -> Path:
    """A tiny random model (`arch` is a tiny_config name or a config) saved by save_pretrained in `dtype`, in
    at least `min_shards` files; returns its directory.

    hub_layout hands save_pretrained the conversions from_pretrained records for a Hub checkpoint: a model
    built from a config would otherwise skip reverting prefix changes (VLMs keep their Hub names that way).
    """
    out = Path(out_dir)
    config = tiny_config(arch, tie=tie) if isinstance(arch, str) else arch
    model = random_model(config, seed, auto_class).to(dtype)
    if hub_layout:
        from transformers.conversion_mapping import get_model_conversion_mapping

        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    shards = set(shard_files(out).values())
    if len(shards) < min_shards:
        raise AssertionError(f"{out} has only {len(shards)} shard(s); lower max_shard_size")
    return out


# -- reading checkpoints ------------------------------------------------------------------------------------
def shard_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single model.safetensors)."""
    d = Path(model_dir)
    if (d / INDEX_NAME).is_file():
        return dict(json.loads((d / INDEX_NAME).read_text())["weight_map"])
    with safe_open(str(d / SINGLE_NAME), "pt") as f:
        return {k: SINGLE_NAME for k in f.keys()}


def load_tensors(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint, by name, in its stored dtype."""
    d = Path(model_dir)
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(shard_files(d).values())):
        with safe_open(str(d / fname), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (for bit-identity checks; NaN-safe, -0.0-safe)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- directory snapshots ------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones too), by relative path, with its contents."""
    directory = Path(directory)
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            out[str(p.relative_to(directory))] = p.read_bytes()
    return out


def tree_listing(directory: Path) -> list[str]:
    """Every entry (files and directories, hidden ones too) under `directory`, relative, sorted."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def tree_hashes(*directories: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime_ns of every file under the given directories: the fingerprint of the inputs."""
    out = {}
    for d in directories:
        for root, _, files in os.walk(d):
            for f in files:
                p = Path(root) / f
                out[str(p)] = (sha256(p), p.stat().st_mtime_ns)
    return out


def assert_same_tree(actual: Path, expected: dict[str, bytes], context: str = "") -> None:
    got = tree_bytes(actual)
    where = f" ({context})" if context else ""
    assert sorted(got) == sorted(expected), f"file names differ{where}: {sorted(set(got) ^ set(expected))}"
    differ = [name for name in expected if got[name] != expected[name]]
    assert not differ, f"files differ from the reference{where}: {differ}"
