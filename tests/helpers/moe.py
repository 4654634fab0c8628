"""Tiny mixture-of-experts models (Qwen3-MoE, Qwen3.5-MoE text, Nemotron-H, Mixtral, gpt-oss, Llama 4 text)
built from configs, and PEFT adapters on their attention projections and expert parameters (`target_parameters`)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.adapters import make_adapter
from helpers.models import build_base

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
COMMON = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "head_dim": 8,
    "tie_word_embeddings": False,
}


def moe_config(family: str):
    """Every token routed to every expert (top-k = E): a bf16 rounding difference then cannot flip a routing
    choice, so logits compare continuously."""
    from transformers import (
        GptOssConfig,
        Llama4TextConfig,
        MixtralConfig,
        Qwen3MoeConfig,
    )

    if family == "qwen3_moe":  # gate_up (E, 48, 32), down (E, 32, 24): the shapes decide the orientation
        return Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        )
    if family == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=4)
    if family == "gpt_oss":  # down_proj (E, 32, 32) is square: only the PEFT version decides it
        return GptOssConfig(
            **COMMON,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=4,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "qwen3_5_moe_text":  # transformers adds qwen2_moe's per-expert rules to qwen3_5_text's renames
        from transformers import Qwen3_5MoeTextConfig

        return Qwen3_5MoeTextConfig(
            **COMMON,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=4,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        )
    if family == "qwen3_5_moe":  # a VLM: the experts follow its text config's model type (qwen3_5_moe_text)
        from transformers import Qwen3_5MoeConfig

        text = moe_config("qwen3_5_moe_text").to_dict()
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)  # fmt: skip
        return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if family == "nemotron_h":  # non-gated experts (up_proj, down_proj); config.json stores time_step_limit's inf
        from transformers import NemotronHConfig

        return NemotronHConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            moe_shared_expert_intermediate_size=24,
            n_routed_experts=4,
            num_experts_per_tok=4,
            n_group=1,
            topk_group=1,
            layers_block_type=["mamba", "moe", "attention"],
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            chunk_size=16,
        )
    if family == "llama4":
        return Llama4TextConfig(
            **COMMON,
            intermediate_size=24,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=4,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
            attn_temperature_tuning=False,
        )
    raise ValueError(family)


def build_moe_base(directory: Path, family: str, max_shard_size: str = "20KB", config=None) -> Path:
    """A random bf16 MoE base of `family` (or `config`) saved by save_pretrained."""
    return build_base(directory, config or moe_config(family), torch.bfloat16, max_shard_size=max_shard_size,
                      min_shards=1)  # fmt: skip


def make_moe_adapter(base: Path, directory: Path, seed: int, **lora) -> Path:
    """An adapter on q_proj/v_proj and both expert parameters, every LoRA tensor ~ N(0, 0.2^2) (none zero)."""
    from peft import LoraConfig

    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERT_PARAMS}
    return make_adapter(base, directory, LoraConfig(**{**config, **lora}), dtype=torch.bfloat16, seed=seed, std=0.2)
