"""Classification adapters (task_type SEQ_CLS: PEFT trains the `score` head as modules_to_save): merged into
a sequence-classification base they equal PEFT's merge (AutoModelForSequenceClassification, every parameter and
the logits); into a causal-LM base, which has no head, they are refused naming the head and the class needed."""

from __future__ import annotations

import json

import pytest
import torch
from builders import assert_same_model, build_base, run_cli, tiny_config
from tiny_models import tree_hashes

import shardmerge


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("cls")
    config = tiny_config("llama")
    config.num_labels = 3
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(root / "base"), max_shard_size="20KB")
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(str(root / "base")),
        LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(root / "adapter"))
    return root


def test_classification_adapter_on_a_classification_base_merges_as_peft(classifier, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    shardmerge.merge(
        {
            "base": str(classifier / "base"),
            "adapters": [str(classifier / "adapter")],
            "output": str(out),
            "device": "cpu",
        }
    )
    reference = (
        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(str(classifier / "base")), str(classifier / "adapter")
        )
        .merge_and_unload()
        .eval()
    )
    assert_same_model(out, reference, AutoModelForSequenceClassification)


def test_classification_adapter_on_a_causal_lm_base_is_refused_naming_the_head_and_class(classifier, tmp_path):
    base = build_base(tmp_path / "causal", "llama", torch.float32)
    before = tree_hashes(base, classifier / "adapter")
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "base": str(base),
                "adapters": [str(classifier / "adapter")],
                "output": str(tmp_path / "out"),
                "device": "cpu",
            }
        )
    )
    rc, stderr = run_cli(plan, "-q")
    assert rc != 0 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "'score'" in lines[0] and "LlamaForSequenceClassification" in lines[0] and "num_labels=3" in lines[0]
    assert not (tmp_path / "out" / "shardmerge-manifest.json").exists()
    assert tree_hashes(base, classifier / "adapter") == before
