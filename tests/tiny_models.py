"""A small multi-shard Llama-shaped base and a PEFT LoRA adapter, written without transformers, plus the
helpers the crash-safety and verify tests share: plan files, directory snapshots, file hashes.

The model is shaped so that a small `max_memory` tiles every projection into several row blocks across
7 shards (about 100 tile writes), which gives fault-injection tests many distinct, reproducible points
to stop at. Everything is deterministic (fixed seed) and about 1.4 MB, so a whole merge takes well under
a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS, RANK = 128, 256, 4, 512, 4, 2, 8
N_SHARDS = 7
MAX_MEMORY = "8320KiB"  # 8 MiB of fixed run overhead + 128 KiB of buffers: every projection in 2-5 row blocks
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "shardmerge-manifest.json"
STATE_DIR = ".shardmerge"
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}  # fmt: skip


def shard_name(i: int, n: int = N_SHARDS) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_base(directory: Path, n_shards: int = N_SHARDS, seed: int = 0) -> Path:
    """A bf16 Llama-shaped base in `n_shards` shards + index + config/generation/tokenizer files."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": randn(VOCAB, HIDDEN),
        "lm_head.weight": randn(VOCAB, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }
    for i in range(LAYERS):
        for name, shape in PROJECTIONS.items():
            tensors[f"model.layers.{i}.{name}.weight"] = randn(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = (1 + randn(HIDDEN)).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for n in range(n_shards):
        group = names[n::n_shards]
        save_file({k: tensors[k] for k in group}, str(directory / shard_name(n, n_shards)), metadata={"format": "pt"})
        weight_map.update({k: shard_name(n, n_shards) for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTERMEDIATE,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
                "vocab_size": VOCAB,
                "max_position_embeddings": 128,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "hidden_act": "silu",
            },
            indent=2,
        )
    )
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return directory


def write_adapter(directory: Path, seed: int = 1) -> Path:
    """A PEFT LoRA adapter (r=8, alpha=16, float32) on all seven projections of every layer."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lora = {}
    for i in range(LAYERS):
        for name, (out_features, in_features) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=g) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=g) * 0.1
    save_file(lora, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": 16,
                "target_modules": [p.split(".")[1] for p in PROJECTIONS],
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            indent=2,
        )
    )
    return directory


def write_plan(path: Path, base: Path, adapter: Path, output: Path, weight: float = 1.0, **options) -> Path:
    """A plan file (YAML is a superset of JSON, so JSON is written: no quoting surprises)."""
    plan = {
        "base": str(base),
        "adapters": [{"path": str(adapter), "weight": weight}],
        "output": str(output),
        "device": "cpu",
        "max_memory": MAX_MEMORY,
        **options,
    }
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


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
    assert not differ, f"files differ from the uninterrupted reference{where}: {differ}"
