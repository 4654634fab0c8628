"""A tiny Llama-shaped model and LoRA adapter, generated deterministically, for the quickstart demo.

`python -m shardmerge.demo DIR` writes DIR/base (3 safetensors shards + index + config.json, the layout
transformers saves) and DIR/adapter (a PEFT LoRA adapter on all seven projections). No download needed.
The tests build their tiny Llama from the same definition (`TinyLlama`) and write every safetensors model
and adapter through `write_checkpoint` and `write_adapter`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TinyLlama:
    """The sizes of a tiny Llama (config.json's), its LoRA rank, and how many shards it is saved in."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2
    rank: int = 8
    shards: int = 3

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """Every Linear of a decoder layer: name -> (out_features, in_features)."""
        kv = self.hidden * self.kv_heads // self.heads
        return {
            "self_attn.q_proj": (self.hidden, self.hidden), "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }  # fmt: skip

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
        }

    def adapter_config(self, base: Path | None = None) -> dict:
        """A LoRA (alpha = 2 r) on all seven projections; `base` is recorded as PEFT records it."""
        config = {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": 2 * self.rank,
            "target_modules": [p.split(".")[1] for p in self.projections],
        }
        if base is not None:
            config["base_model_name_or_path"] = str(base)
        return {
            **config,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }

    def base_tensors(self, generator, noisy_norms: bool = False) -> dict:
        """bf16 matrices ~ N(0, 0.02^2); the final norm is ones, the layer norms too unless `noisy_norms`
        (then 1 + N(0, 0.02^2), so a merge that touched them would show)."""
        import torch

        def randn(*shape):
            return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

        tensors = {
            "model.embed_tokens.weight": randn(self.vocab, self.hidden),
            "lm_head.weight": randn(self.vocab, self.hidden),
            "model.norm.weight": torch.ones(self.hidden, dtype=torch.bfloat16),
        }
        for i in range(self.layers):
            for name, shape in self.projections.items():
                tensors[f"model.layers.{i}.{name}.weight"] = randn(*shape)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                ones = torch.ones(self.hidden, dtype=torch.bfloat16)
                tensors[f"model.layers.{i}.{norm}.weight"] = (ones + randn(self.hidden)) if noisy_norms else ones
        return tensors

    def lora_tensors(self, generator) -> dict:
        """float32 lora_A/lora_B ~ N(0, 0.1^2) for every projection of every layer, in PEFT's key names."""
        import torch

        lora = {}
        for i in range(self.layers):
            for name, (out_features, in_features) in self.projections.items():
                key = f"base_model.model.model.layers.{i}.{name}"
                lora[f"{key}.lora_A.weight"] = torch.randn(self.rank, in_features, generator=generator) * 0.1
                lora[f"{key}.lora_B.weight"] = torch.randn(out_features, self.rank, generator=generator) * 0.1
        return lora


def round_robin(tensors: dict, shards: int) -> list[dict]:
    """The tensors dealt over `shards` files by sorted name, so every shard holds a bit of every layer."""
    names = sorted(tensors)
    return [{k: tensors[k] for k in names[i::shards]} for i in range(shards)]


def write_checkpoint(directory: Path, shards: list[dict], config: dict) -> Path:
    """A safetensors checkpoint as transformers saves it: one model.safetensors, or several
    model-0000i-of-0000n.safetensors files with an index, and config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, group in enumerate(shards):
            file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(group, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
        total = sum(t.numel() * t.element_size() for group in shards for t in group.values())
        (directory / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_adapter(directory: Path, tensors: dict, config: dict) -> Path:
    """A PEFT adapter directory: adapter_model.safetensors and adapter_config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_demo(directory: Path) -> None:
    """The quickstart's tiny base and adapter, both drawn from one seeded generator."""
    import torch

    model, generator = TinyLlama(), torch.Generator().manual_seed(0)
    base = write_checkpoint(
        directory / "base", round_robin(model.base_tensors(generator), model.shards), model.config()
    )
    write_adapter(directory / "adapter", model.lora_tensors(generator), model.adapter_config(base))


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-model")
    write_demo(target)
    print(f"wrote a tiny Llama-shaped model to {target / 'base'} and a LoRA adapter to {target / 'adapter'}")
