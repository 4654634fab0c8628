"""trainable_token_indices (PEFT's trainable tokens beside LoRA) against merge_and_unload."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import shardmerge


@pytest.mark.parametrize("indices", [[1, 5, 9], {"embed_tokens": [0, 63]}], ids=["list", "mapping"])
def test_trainable_tokens_replace_embedding_rows_as_peft(tmp_path, indices):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"), max_shard_size="20KB")
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(tmp_path / "base")),
        LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices),
    )
    for name, param in peft_model.named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reference = (
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
        .merge_and_unload()
        .state_dict()
    )

    shardmerge.merge(
        {
            "base": str(tmp_path / "base"),
            "adapters": [str(tmp_path / "adapter")],
            "output": str(tmp_path / "out"),
            "max_memory": "9MiB",
        }
    )
    merged = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(merged["model.embed_tokens.weight"], base)
