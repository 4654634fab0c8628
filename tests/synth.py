"""Small synthetic inputs written straight to disk (no transformers), for planner, CLI and memory tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file


def write_base(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2, config: dict | None = None) -> Path:
    """Tensors split round-robin over `shards` files with an index (or one model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            group = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in group}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in group})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return directory


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config})
    )
    return directory


def lora_pair(module: str, out_features: int, in_features: int, r: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    key = f"base_model.model.{module}"
    return {
        f"{key}.lora_A.weight": torch.randn(r, in_features, generator=g),
        f"{key}.lora_B.weight": torch.randn(out_features, r, generator=g),
    }


def write_plan(path: Path, **plan) -> Path:
    path.write_text(yaml.safe_dump(plan))
    return path


def tiny_llama(tmp: Path, dtype=torch.bfloat16, layers: int = 2, hidden: int = 16) -> tuple[Path, Path]:
    """A base with q_proj/o_proj/norms over several shards, and an adapter on q_proj."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(32, hidden, generator=g).to(dtype),
        "model.norm.weight": torch.ones(hidden, dtype=dtype),
    }
    adapter = {}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g).to(dtype)
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=g).to(dtype)
        adapter.update(lora_pair(f"model.layers.{i}.self_attn.q_proj", hidden, hidden, seed=i))
    base = write_base(tmp / "base", tensors, shards=3)
    return base, write_adapter(tmp / "adapter", adapter)
