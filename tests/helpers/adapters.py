"""PEFT adapters: written from given tensors (the one writer), or made by PEFT itself on a base model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from helpers.models import TINY, quiet, write_model
from shardmerge import demo


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], legacy: bool = False, **config) -> Path:
    """adapter_model.safetensors holding `tensors` and an adapter_config.json: a LoRA with r=4, lora_alpha=8
    on q_proj, unless `config` says otherwise (its keys are the config's). `legacy`: the tensors pickled into
    adapter_model.bin instead (torch.save), as PEFT saved adapters before safetensors."""
    directory = Path(directory)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    if not legacy:
        return demo.write_adapter(directory, tensors, config)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, directory / "adapter_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def lora_pair(module: str, out_features: int, in_features: int, r: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Standard-normal lora_A (r, in) and lora_B (out, r) for `module`, in PEFT's key names."""
    g = torch.Generator().manual_seed(seed)
    key = f"base_model.model.{module}"
    return {
        f"{key}.lora_A.weight": torch.randn(r, in_features, generator=g),
        f"{key}.lora_B.weight": torch.randn(out_features, r, generator=g),
    }


def write_tiny_adapter(directory: Path, seed: int = 1) -> Path:
    """A LoRA (r=8, alpha=16, float32) on all seven projections of every layer of models.TINY."""
    return demo.write_adapter(
        Path(directory), TINY.lora_tensors(torch.Generator().manual_seed(seed)), TINY.adapter_config()
    )


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding adapter_config.json: `path` itself, or its single subdirectory that has one
    (PEFT's save_pretrained writes a non-default adapter name to `path/<name>/`)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    subs = [s for s in sorted(p.iterdir()) if (s / "adapter_config.json").is_file()]
    if len(subs) != 1:
        raise FileNotFoundError(f"no unique adapter_config.json under {p}")
    return subs[0]


def make_adapter(
    base,
    adapter_dir: str | os.PathLike,
    lora_config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 1,
    adapter_name: str = "default",
    adapter_in_model_dtype: bool = False,
    std: float = 0.1,
    mutate_state_dict=None,
    auto_class=None,
) -> Path:
    """Create a PEFT adapter on the base, make every trainable tensor non-trivial, save it.

    `base` is a model directory (loaded in `dtype` with `auto_class`, default AutoModelForCausalLM) or a
    model in memory. All lora_A/lora_B/lora_embedding_A/B (and lora_B.bias) are drawn from N(0, std^2);
    DoRA magnitude vectors are multiplied by 1 + 0.25 * N(0,1) clamped to [0.5, 1.5]; every other trainable
    tensor (modules_to_save copies, trained biases) gets N(0, 0.05^2) added.

    adapter_in_model_dtype=False is PEFT's default (LoRA weights upcast to and saved in float32);
    True keeps (and saves) them in the model dtype, as an adapter trained in bf16/fp16 would be.
    mutate_state_dict(dict) may edit the saved tensors in place (rewritten after saving).
    Returns the path to give shardmerge: `adapter_dir` (for a non-default name PEFT writes the adapter
    into `adapter_dir/<adapter_name>/`; resolve_adapter_dir finds it).
    """
    quiet()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = base
    if not isinstance(base, torch.nn.Module):
        model = (auto_class or AutoModelForCausalLM).from_pretrained(str(base), dtype=dtype)
    peft_model = get_peft_model(
        model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=not adapter_in_model_dtype
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                p.mul_((1.0 + 0.25 * noise).clamp(0.5, 1.5).to(p.dtype))
            elif "lora_" in name:
                p.copy_(noise * std)
            else:
                p.add_((noise * 0.05).to(p.dtype))
    out = Path(adapter_dir)
    peft_model.save_pretrained(str(out))
    if mutate_state_dict is not None:
        from safetensors.torch import load_file, save_file

        f = resolve_adapter_dir(out) / "adapter_model.safetensors"
        sd = load_file(str(f))
        mutate_state_dict(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
    return out


def q_proj_case(tmp: Path, dtype=torch.bfloat16, layers: int = 2, hidden: int = 16) -> tuple[Path, Path]:
    """tmp/base: q_proj/o_proj/norms (hidden 16) over 3 shards; tmp/adapter: a LoRA on every q_proj."""
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
    return write_model(tmp / "base", tensors, shards=3), write_adapter(tmp / "adapter", adapter)
