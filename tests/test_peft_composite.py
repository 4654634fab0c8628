"""Conv1D orientation per sub-model: a GPT-2 decoder (Conv1D, weights stored (in, out)) inside a
VisionEncoderDecoder or EncoderDecoder whose encoder is Linear, with LoRA on square layers of both, and a
remote-code GPT-2 fork whose architecture is unknown (its adapter's fan_in_fan_out: true is trusted). Each
merge is loaded with transformers and compared with PEFT's merge_and_unload: every parameter and the logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import build_base, load_tensors, randomize, tensor_bytes
from helpers.reference import assert_same_model, peft_merged

import shardmerge

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _gpt2_decoder():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        decoder_start_token_id=1,
    )


def _vision_encoder_decoder():
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(image_size=16, patch_size=8, **TINY), _gpt2_decoder()
    )
    return VisionEncoderDecoderModel(config), {"pixel_values": torch.randn(2, 3, 16, 16, generator=_g())}


def _encoder_decoder():
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(vocab_size=96, **TINY), _gpt2_decoder())
    return EncoderDecoderModel(config), {"input_ids": torch.randint(3, 96, (2, 7), generator=_g())}


def _g():
    return torch.Generator().manual_seed(7)


def _logits(model, inputs):
    decoder_input_ids = torch.randint(3, 96, (2, 5), generator=_g())
    with torch.no_grad():
        return model(**inputs, decoder_input_ids=decoder_input_ids).logits


@pytest.mark.parametrize(
    "build", [_vision_encoder_decoder, _encoder_decoder], ids=["vision-encoder-decoder", "encoder-decoder"]
)
def test_gpt2_decoder_in_a_composite_model_merges_as_peft(tmp_path, build):
    from peft import LoraConfig

    model, inputs = build()
    randomize(model, seed=0)
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="40KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    cls = type(model)
    # square layers on both sides: decoder attn.c_proj (Conv1D, 32x32) and the encoder's query/value (Linear, 32x32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj", "query", "value"])
    make_adapter(tmp_path / "base", tmp_path / "adapter", lora, dtype=torch.float32, std=0.2, auto_class=cls)
    reference = peft_merged(tmp_path / "base", [tmp_path / "adapter"], cls)

    shardmerge.merge(
        {
            "base": str(tmp_path / "base"),
            "adapters": [str(tmp_path / "adapter")],
            "output": str(tmp_path / "out"),
            "device": "cpu",
        }
    )
    merged = cls.from_pretrained(str(tmp_path / "out")).eval()
    want = dict(reference.named_parameters())
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(_logits(merged, inputs), _logits(reference, inputs), rtol=1e-4, atol=1e-5)
    base = load_tensors(tmp_path / "base")
    moved = [n for n, t in load_tensors(tmp_path / "out").items() if tensor_bytes(t) != tensor_bytes(base[n])]
    assert moved and all(n.split(".")[-2] in ("c_proj", "query", "value") for n in moved), moved


def test_remote_code_gpt2_fork_trusts_the_adapters_fan_in_fan_out(tmp_path):
    from peft import LoraConfig

    base = build_base(tmp_path / "base", "gpt2", torch.float32)
    adapter = make_adapter(
        base, tmp_path / "adapter", LoraConfig(r=4, target_modules=["c_proj"], fan_in_fan_out=True), dtype=torch.float32
    )
    fork = tmp_path / "fork"
    shutil.copytree(base, fork)
    config = json.loads((fork / "config.json").read_text())
    config.update(model_type="gpt2-fork", auto_map={"AutoModelForCausalLM": "modeling_fork.ForkLMHeadModel"})
    (fork / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    shardmerge.merge({"base": str(fork), "adapters": [str(adapter)], "output": str(out), "device": "cpu"})
    shutil.copyfile(base / "config.json", out / "config.json")  # the fork's weights are GPT-2's: load them as such
    assert_same_model(out, peft_merged(base, [adapter]))
