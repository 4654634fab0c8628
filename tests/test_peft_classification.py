"""Classification adapters (task_type SEQ_CLS: PEFT trains the `score` head as modules_to_save): merged into
a sequence-classification base they equal PEFT's merge (AutoModelForSequenceClassification, every parameter and
the logits); into a causal-LM base, which has no head, they are refused naming the head and the class needed."""

from __future__ import annotations

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import build_base, tiny_config, tree_hashes
from helpers.plans import run_cli, write_plan
from helpers.reference import assert_same_model, peft_merged

import shardmerge


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("cls")
    config = tiny_config("llama")
    config.num_labels = 3
    build_base(root / "base", config, torch.float32, auto_class=AutoModelForSequenceClassification)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"])
    make_adapter(
        root / "base", root / "adapter", lora, dtype=torch.float32, auto_class=AutoModelForSequenceClassification
    )
    return root


def test_classification_adapter_on_a_classification_base_merges_as_peft(classifier, tmp_path):
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
    reference = peft_merged(classifier / "base", [classifier / "adapter"], AutoModelForSequenceClassification)
    assert_same_model(out, reference, AutoModelForSequenceClassification)


def test_classification_adapter_on_a_causal_lm_base_is_refused_naming_the_head_and_class(classifier, tmp_path):
    base = build_base(tmp_path / "causal", "llama", torch.float32)
    before = tree_hashes(base, classifier / "adapter")
    plan = write_plan(
        tmp_path / "plan.yaml", base=base, adapters=[classifier / "adapter"], output=tmp_path / "out", device="cpu"
    )
    result = run_cli(plan, "-q")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'score'" in lines[0] and "LlamaForSequenceClassification" in lines[0] and "num_labels=3" in lines[0]
    assert not (tmp_path / "out" / "shardmerge-manifest.json").exists()
    assert tree_hashes(base, classifier / "adapter") == before
