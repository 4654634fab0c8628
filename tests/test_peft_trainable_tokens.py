"""trainable_token_indices (PEFT's trainable tokens beside LoRA) against merge_and_unload."""

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import build_base, tiny_config
from helpers.plans import run_cli, write_plan
from helpers.reference import peft_merged
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import shardmerge


@pytest.mark.parametrize("indices", [[1, 5, 9], {"embed_tokens": [0, 63]}], ids=["list", "mapping"])
def test_trainable_tokens_replace_embedding_rows_as_peft(tmp_path, indices):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    build_base(tmp_path / "base", config, torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices)
    make_adapter(tmp_path / "base", tmp_path / "adapter", lora, dtype=torch.float32, auto_class=LlamaForCausalLM)
    reference = peft_merged(tmp_path / "base", [tmp_path / "adapter"], LlamaForCausalLM).state_dict()

    shardmerge.merge(
        {
            "base": str(tmp_path / "base"),
            "adapters": [str(tmp_path / "adapter")],
            "output": str(tmp_path / "out"),
            "max_memory": "17MiB",
        }
    )
    merged = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).state_dict()["model.embed_tokens.weight"]
    assert not torch.equal(merged["model.embed_tokens.weight"], base)


def test_two_adapters_training_the_same_token_rows_are_refused_naming_the_rows_and_the_other_adapter(tmp_path):
    """PEFT keeps one trainable-tokens adapter active per layer, so there is no merge of both to match."""
    build_base(tmp_path / "base", tiny_config("llama"), torch.float32)
    for name, indices in (("a", [1, 5, 9]), ("b", [9, 20])):
        lora = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices)
        make_adapter(tmp_path / "base", tmp_path / name, lora, dtype=torch.float32, auto_class=LlamaForCausalLM)
    adapters = [tmp_path / "a", tmp_path / "b"]
    plan = write_plan(tmp_path / "plan.yaml", base=tmp_path / "base", adapters=adapters, output=tmp_path / "out")
    result = run_cli(plan, "-q")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "trainable token ids [9]" in line and f"also trained by {tmp_path / 'a'}" in line, line
    assert not list((tmp_path / "out").glob("*.safetensors"))
