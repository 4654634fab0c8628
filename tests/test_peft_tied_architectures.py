"""Tied weights of architectures whose tied names follow no common pattern, against PEFT's merge_and_unload.

transformers ties what each model class lists in `_tied_weights_keys`: Marian's head and both stacks'
embed_tokens to `shared`, BERT's `cls.predictions.decoder` (weight and bias), XLM's `pred_layer.proj`, ELECTRA's
`generator_lm_head`, ProphetNet's head and stack embeddings to `word_embeddings`, FSMT's encoder embedding and
`output_projection` to the decoder's embedding. shardmerge reads those lists from transformers' source (without
importing it). Each case merges a tiny random model with LoRA on tied modules and/or modules_to_save on one of
them, loads the output with the model's class and compares every parameter, the logits and the config's tying
with PEFT's merged model. Without transformers' source the name rules stand in, and refuse what they cannot name.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import VOCAB, build_base, quiet
from helpers.reference import assert_same_model, input_ids, peft_merged

import shardmerge
from shardmerge import modelsource, ties

SMALL = dict(vocab_size=VOCAB, max_position_embeddings=64)


def _marian():
    from transformers import AutoModelForSeq2SeqLM, MarianConfig

    config = MarianConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
                          decoder_start_token_id=0, eos_token_id=2, **SMALL)  # fmt: skip
    return config, AutoModelForSeq2SeqLM


def _prophetnet():
    from transformers import AutoModelForSeq2SeqLM, ProphetNetConfig

    config = ProphetNetConfig(hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1,
                              num_decoder_layers=1, num_encoder_attention_heads=2, num_decoder_attention_heads=2,
                              ngram=2, **SMALL)  # fmt: skip
    return config, AutoModelForSeq2SeqLM


def _fsmt():
    from transformers import AutoModelForSeq2SeqLM, FSMTConfig

    config = FSMTConfig(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, langs=["en", "de"], pad_token_id=1,
                        tie_word_embeddings=True)  # fmt: skip
    return config, AutoModelForSeq2SeqLM


def _bert():
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **SMALL)
    return config, AutoModelForMaskedLM


def _electra():
    from transformers import AutoModelForMaskedLM, ElectraConfig

    config = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, **SMALL)  # fmt: skip
    return config, AutoModelForMaskedLM


def _xlm():
    from transformers import AutoModelForCausalLM, XLMConfig

    config = XLMConfig(emb_dim=32, n_layers=1, n_heads=2, **SMALL)
    return config, AutoModelForCausalLM


def _bert2bert():
    from transformers import AutoModelForSeq2SeqLM, BertConfig, EncoderDecoderConfig

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **SMALL)
    decoder = BertConfig(is_decoder=True, add_cross_attention=True, **small)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(**small), decoder)
    config.decoder_start_token_id = config.pad_token_id = 0
    return config, AutoModelForSeq2SeqLM


MODELS = {
    "bert2bert": _bert2bert,
    "marian": _marian,
    "prophetnet": _prophetnet,
    "fsmt": _fsmt,
    "bert": _bert,
    "electra": _electra,
    "xlm": _xlm,
}
SEQ2SEQ = {"bert2bert", "marian", "prophetnet", "fsmt"}


def _case(tmp_path: Path, model: str, **lora) -> tuple[Path, Path, object]:
    from peft import LoraConfig

    quiet()
    config, auto_class = MODELS[model]()
    base = build_base(tmp_path / "base", config, torch.float32, auto_class=auto_class, min_shards=1)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, **lora), dtype=torch.float32,
                           auto_class=auto_class)  # fmt: skip
    return base, adapter, auto_class


def _merge(tmp_path: Path, base: Path, adapter: Path) -> Path:
    out = tmp_path / "merged"
    shardmerge.merge({"base": str(base), "adapters": [str(adapter)], "output": str(out), "device": "cpu"})
    return out


def _assert_same_as_peft(out: Path, base: Path, adapter: Path, model: str, auto_class) -> None:
    reference = peft_merged(base, [adapter], auto_class)
    ids = input_ids()
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :6]} if model in SEQ2SEQ else None
    merged = assert_same_model(out, reference, auto_class, inputs=inputs)
    tied = getattr(reference.config, "tie_word_embeddings", None)  # a composite's sub-configs hold it
    if tied is not None:
        assert merged.config.tie_word_embeddings == tied
        assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) == tied


@pytest.mark.parametrize(
    "model, lora",
    [
        ("marian", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
        ("marian", dict(target_modules=["q_proj", "embed_tokens", "lm_head"])),
        ("prophetnet", dict(target_modules=["query_proj"], modules_to_save=["lm_head"])),
        ("fsmt", dict(target_modules=["q_proj", "embed_tokens", "output_projection"])),
        ("bert", dict(target_modules=["query", "decoder"], modules_to_save=["word_embeddings"])),
        ("electra", dict(target_modules=["query", "generator_lm_head", "word_embeddings"])),
        ("xlm", dict(target_modules=["q_lin"], modules_to_save=["transformer.embeddings"])),
        ("xlm", dict(target_modules=["q_lin", "pred_layer.proj"])),
        ("bert", dict(target_modules=["query"], modules_to_save=["word_embeddings"], ensure_weight_tying=True)),
        ("bert2bert", dict(target_modules=["query"], modules_to_save=["decoder.bert.embeddings.word_embeddings"])),
    ],
    ids=[
        "marian-save-head",
        "marian-lora-head-and-stack-embeddings",
        "prophetnet-save-head",
        "fsmt-lora-on-both-embeddings-and-output-projection",
        "bert-lora-mlm-decoder-save-embedding",
        "electra-lora-generator-head-and-embedding",
        "xlm-save-embedding",
        "xlm-lora-pred-layer",
        "bert-ensure-weight-tying-on-a-module-peft-does-not-tie",  # PEFT ties only embed_tokens/lm_head copies
        "encoder-decoder-save-the-decoders-embedding",
    ],
)
def test_tied_weights_of_the_model_class_merge_as_peft(tmp_path, model, lora):
    base, adapter, auto_class = _case(tmp_path, model, **lora)
    out = _merge(tmp_path, base, adapter)
    _assert_same_as_peft(out, base, adapter, model, auto_class)


def test_without_transformers_source_the_name_rules_untie_a_llama_as_peft(tmp_path, monkeypatch):
    from peft import LoraConfig

    monkeypatch.setattr(ties, "tied_weights", lambda config, architecture: None)
    base = build_base(tmp_path / "base", "llama", torch.float32, tie=True)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, target_modules=["q_proj"],
                           modules_to_save=["lm_head"]), dtype=torch.float32)  # fmt: skip
    out = _merge(tmp_path, base, adapter)
    reference = peft_merged(base, [adapter])
    assert assert_same_model(out, reference).config.tie_word_embeddings is False


def test_without_transformers_source_untying_a_head_the_name_rules_cannot_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ties, "tied_weights", lambda config, architecture: None)
    base, adapter, _ = _case(tmp_path, "marian", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(shardmerge.ShardmergeError, match="MarianMTModel model, whose head name is not known here"):
        _merge(tmp_path, base, adapter)
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").glob("*.safetensors"))


def _built_ties(model_class: str, **config) -> dict:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, model_class)
    with torch.device("meta"):
        model = cls(CONFIG_MAPPING[cls.config_class.model_type](**config))
    return dict(model.all_tied_weights_keys)


@pytest.mark.parametrize(
    "model_class, config",
    [
        ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_hidden_layers=1)),
        ("LlamaForCausalLM", dict(num_hidden_layers=1)),  # the class default: untied
        ("MarianMTModel", dict(encoder_layers=1, decoder_layers=1)),
        ("MarianMTModel", dict(encoder_layers=1, decoder_layers=1, share_encoder_decoder_embeddings=False)),
        ("T5ForConditionalGeneration", dict(num_layers=1, tie_word_embeddings=False)),  # T5's config ties anyway
        ("BartModel", dict(encoder_layers=1, decoder_layers=1)),
        ("BertForMaskedLM", dict(num_hidden_layers=1)),
        ("BertForSequenceClassification", dict(num_hidden_layers=1)),
        ("FSMTForConditionalGeneration", dict(encoder_layers=1, decoder_layers=1, tie_word_embeddings=True)),
        ("LlavaForConditionalGeneration", dict(text_config={"model_type": "llama", "tie_word_embeddings": True})),
    ],
)
def test_tied_weights_read_from_the_source_are_those_of_the_built_model(model_class, config):
    import transformers

    quiet()
    saved = getattr(transformers, model_class).config_class(**config).to_dict()
    found = modelsource.tied_weights({**saved, "architectures": [model_class]}, model_class)
    assert found is not None
    assert found == _built_ties(model_class, **config)


def test_tied_weights_of_sub_models_built_from_sub_configs_are_read_under_their_names():
    import transformers
    from transformers import BertConfig, EncoderDecoderConfig

    quiet()
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**small), BertConfig(is_decoder=True, add_cross_attention=True, **small)
    )
    found = modelsource.tied_weights(
        {**config.to_dict(), "architectures": ["EncoderDecoderModel"]}, "EncoderDecoderModel"
    )
    with torch.device("meta"):
        model = transformers.EncoderDecoderModel(config)
    assert found is not None and found == dict(model.all_tied_weights_keys)
    assert found["decoder.cls.predictions.decoder.weight"] == "decoder.bert.embeddings.word_embeddings.weight"


def test_tied_weights_set_by_code_the_reader_cannot_follow_are_not_guessed():
    from transformers import Zamba2Config

    config = {**Zamba2Config().to_dict(), "architectures": ["Zamba2ForCausalLM"]}
    assert modelsource.tied_weights(config, "Zamba2ForCausalLM") is None


def test_a_config_with_remote_code_is_not_read_from_transformers_classes_of_the_same_name():
    from transformers import LlamaConfig

    config = {**LlamaConfig(tie_word_embeddings=True).to_dict(), "architectures": ["LlamaForCausalLM"]}
    assert modelsource.tied_weights(config, "LlamaForCausalLM") == {"lm_head.weight": "model.embed_tokens.weight"}
    remote = {**config, "auto_map": {"AutoModelForCausalLM": "modeling_custom.LlamaForCausalLM"}}
    assert modelsource.tied_weights(remote, "LlamaForCausalLM") is None


def test_reading_tied_weights_never_imports_transformers():
    code = (
        "import sys; from shardmerge import modelsource; "
        "found = modelsource.tied_weights({'model_type': 'marian'}, 'MarianMTModel'); "
        "print(sorted(found), 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    keys, imported = result.stdout.rsplit(" ", 1)
    assert ast.literal_eval(keys) == [
        "lm_head.weight",
        "model.decoder.embed_tokens.weight",
        "model.encoder.embed_tokens.weight",
    ]
    assert imported.strip() == "False"
