"""A tiny Llama-shaped model and LoRA adapter, generated deterministically, for the quickstart demo.

`python -m shardmerge.demo DIR` writes DIR/base (3 safetensors shards + index + config.json, the layout
transformers saves) and DIR/adapter (a PEFT LoRA adapter on all seven projections). No download needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS, RANK = 64, 128, 4, 256, 4, 2, 8
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}  # fmt: skip


def write_demo(directory: Path) -> None:
    """The quickstart's tiny base, adapter and plan. One function on purpose: it is a recipe, read top to bottom."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": randn(VOCAB, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": randn(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        for name, shape in PROJECTIONS.items():
            tensors[f"model.layers.{i}.{name}.weight"] = randn(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    base = directory / "base"
    base.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for n, group in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(base / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (base / "config.json").write_text(
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
    adapter = directory / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    lora = {}
    for i in range(LAYERS):
        for name, (out_features, in_features) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.1
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": 16,
                "target_modules": [p.split(".")[1] for p in PROJECTIONS],
                "base_model_name_or_path": str(base),
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-model")
    write_demo(target)
    print(f"wrote a tiny Llama-shaped model to {target / 'base'} and a LoRA adapter to {target / 'adapter'}")
