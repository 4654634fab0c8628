"""PEFT parity on architectures and adapter configs beyond the Llama-shaped ones: each test builds a tiny random
model of one family, lets PEFT make and merge an adapter on it, and compares shardmerge's output at model level
(every parameter and the logits). Found by sweeping transformers' families against merge_and_unload()."""

from __future__ import annotations

import torch
from helpers.adapters import make_adapter
from helpers.models import build_base
from helpers.moe import moe_config
from helpers.reference import assert_same_model, peft_merged

import shardmerge


def _merge(tmp_path, base, *adapters):
    return shardmerge.merge(
        {"base": str(base), "adapters": [str(a) for a in adapters], "output": str(tmp_path / "out"), "device": "cpu"}
    )


def test_all_linear_on_mixtral_merges_the_router_and_the_experts(tmp_path):
    """On Mixtral, PEFT's all-linear adds target_parameters [gate_up_proj, down_proj, gate.weight]: the experts'
    3-D parameters and the router's 2-D weight, which its ParamWrapper merges as a Linear (W + s * B @ A)."""
    from peft import LoraConfig

    base = build_base(tmp_path / "base", moe_config("mixtral"), torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           dtype=torch.float32)  # fmt: skip
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter]))


def _bart(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, BartConfig

    sizes = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    config = BartConfig(vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        **sizes)  # fmt: skip
    return build_base(tmp_path / "base", config, torch.float32, auto_class=AutoModelForSeq2SeqLM), AutoModelForSeq2SeqLM


def test_modules_to_save_on_the_head_of_bart_unties_it_and_keeps_both_stacks_embeddings(tmp_path):
    """BART stores only model.shared; lm_head and both stacks' embed_tokens are tied to it. PEFT's own copy of
    lm_head unties the pair (tie_word_embeddings false), after which transformers no longer ties the stacks'
    embeddings either: the output stores the head and both embeddings, which keep the (LoRA-merged) shared."""
    from peft import LoraConfig

    base, auto = _bart(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["shared", "q_proj"], modules_to_save=["lm_head"])
    adapter = make_adapter(base, tmp_path / "adapter", config, dtype=torch.float32, auto_class=auto)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter], auto), auto)


def test_modules_to_save_on_the_shared_embedding_of_bart_leaves_the_stacks_on_the_original(tmp_path):
    """PEFT's copy replaces the `shared` module only; the head and the stacks' embed_tokens keep the original
    matrix, which the output now stores under their own names."""
    from peft import LoraConfig

    base, auto = _bart(tmp_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["shared"])
    adapter = make_adapter(base, tmp_path / "adapter", config, dtype=torch.float32, auto_class=auto)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter], auto), auto)


def test_bias_all_with_a_nested_classification_head_merges_the_heads_copy(tmp_path):
    """bias="all" saves a modules_to_save copy's biases twice: as the copy (`classifier.dense.bias`) and under
    its in-memory name (`classifier.modules_to_save.default.dense.bias`); PEFT loads the first over the second."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    config = RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=70, num_labels=3, pad_token_id=1)  # fmt: skip
    auto = AutoModelForSequenceClassification
    base = build_base(tmp_path / "base", config, torch.float32, auto_class=auto)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")
    adapter = make_adapter(base, tmp_path / "adapter", lora, dtype=torch.float32, auto_class=auto)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter], auto), auto)


def _adalora_case(tmp_path, **config):
    from peft import AdaLoraConfig

    base = build_base(tmp_path / "base", "llama", torch.float32)
    lora = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=16, target_modules=["q_proj", "v_proj"], total_step=10,
                         **config)  # fmt: skip
    return base, make_adapter(base, tmp_path / "adapter", lora, dtype=torch.float32)


def test_adalora_merges_b_at_a_times_its_singular_values(tmp_path):
    """AdaLoRA's SVDLinear: W + B @ (A * E) * lora_alpha / (ranknum + 1e-5), ranknum = init_r."""
    base, adapter = _adalora_case(tmp_path)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter]))


def test_adalora_with_ranks_pruned_by_its_budget_still_divides_by_init_r(tmp_path):
    """The budget's rank_pattern saves only the kept ranks; PEFT's resize keeps ranknum at init_r."""
    keep = {f"model.layers.{i}.self_attn.{m}.lora_E": [True, False, True, True, False, i == 0]
            for i in range(2) for m in ("q_proj", "v_proj")}  # fmt: skip
    base, adapter = _adalora_case(tmp_path, rank_pattern=keep)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter]))


def test_modules_to_save_on_the_embedding_of_a_classifier_replaces_it_with_nothing_to_untie(tmp_path):
    """BertForSequenceClassification has no output embedding, so tie_word_embeddings ties nothing to the
    embedding PEFT gives its own copy: the copy simply replaces it."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)  # fmt: skip
    auto = AutoModelForSequenceClassification
    base = build_base(tmp_path / "base", config, torch.float32, auto_class=auto)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["word_embeddings"],
                      task_type="SEQ_CLS")  # fmt: skip
    adapter = make_adapter(base, tmp_path / "adapter", lora, dtype=torch.float32, auto_class=auto)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter], auto), auto)


def test_modules_to_save_on_mambas_embeddings_unties_its_head(tmp_path):
    """Mamba names its input embedding `backbone.embeddings`; its head is tied to it and not stored. PEFT's
    copy of the embedding leaves the head on the original matrix, so the output must store lm_head.weight."""
    from peft import LoraConfig
    from transformers import MambaConfig

    config = MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4, intermediate_size=64)
    base = build_base(tmp_path / "base", config, torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["x_proj"], modules_to_save=["embeddings"])
    adapter = make_adapter(base, tmp_path / "adapter", lora, dtype=torch.float32)
    _merge(tmp_path, base, adapter)
    assert_same_model(tmp_path / "out", peft_merged(base, [adapter]))
