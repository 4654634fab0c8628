"""Tied input and output embeddings (tie_word_embeddings) against PEFT's merge_and_unload, at model level.

PEFT gives a modules_to_save entry its own copy, so a merge that trains the head or the embedding of a tied
model unties them (config.json says tie_word_embeddings: false and both tensors are stored); LoRA on a tied
module changes the one shared matrix. A checkpoint that stores the head beside a tied embedding is one matrix
for transformers when the two are equal, two when they differ. Each case loads shardmerge's output with
AutoModelForCausalLM and compares every parameter, the logits and the config's tying with PEFT's merged model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import INDEX_NAME, add_tensor, build_base, load_tensors, shard_files, tensor_bytes
from helpers.reference import assert_same_model, peft_merged

import shardmerge

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _merge(tmp_path: Path, base: Path, adapters: list[Path]) -> Path:
    out = tmp_path / "merged"
    shardmerge.merge(
        {
            "base": str(base),
            "adapters": [str(a) for a in adapters],
            "output": str(out),
            "device": "cpu",
            "max_memory": "17MiB",
        }
    )
    return out


def _assert_same_model(out: Path, reference) -> None:
    model = assert_same_model(out, reference)
    assert model.config.tie_word_embeddings == reference.config.tie_word_embeddings
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared == (reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr())


def _assert_untouched_bit_identical(base: Path, out: Path, touched: set[str]) -> None:
    base_tensors, out_tensors = load_tensors(base), load_tensors(out)
    for name in set(base_tensors) - touched:
        assert tensor_bytes(out_tensors[name]) == tensor_bytes(base_tensors[name]), name


def _tied_base(tmp_path: Path) -> Path:
    return build_base(tmp_path / "base", "llama", torch.float32, tie=True)


def _store_head(tmp_path: Path, base: Path, offset: float) -> Path:
    """The tied base with lm_head.weight stored too, next to the embedding: equal to it, or `offset` away."""
    both = Path(shutil.copytree(base, tmp_path / f"base-both-{offset}"))
    return add_tensor(both, HEAD, load_tensors(base)[EMBED] + offset, beside=EMBED)


def _adapter(tmp_path: Path, base: Path, name: str = "adapter", seed: int = 1, **lora) -> Path:
    from peft import LoraConfig

    return make_adapter(base, tmp_path / name, LoraConfig(r=4, lora_alpha=8, **lora), dtype=torch.float32, seed=seed)


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"]),
        dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    ],
    ids=["save-head", "save-embedding-lora-head", "save-head-lora-embedding", "save-both"],
)
def test_modules_to_save_on_a_tied_embedding_unties_it_as_peft(tmp_path, lora):
    base = _tied_base(tmp_path)
    adapter = _adapter(tmp_path, base, **lora)
    out = _merge(tmp_path, base, [adapter])
    reference = peft_merged(base, [adapter])
    assert reference.config.tie_word_embeddings is False
    _assert_same_model(out, reference)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert HEAD in shard_files(out), "the untied head is in the index"
    assert shard_files(out)[HEAD] == shard_files(out)[EMBED], "placed in the embedding's shard"
    _assert_untouched_bit_identical(
        base, out, {EMBED, "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    )


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        dict(target_modules=["q_proj", "embed_tokens"]),
    ],
    ids=["save-embedding", "lora-embedding"],
)
def test_ensure_weight_tying_keeps_one_shared_matrix_as_peft(tmp_path, lora):
    base = _tied_base(tmp_path)
    adapter = _adapter(tmp_path, base, ensure_weight_tying=True, **lora)
    out = _merge(tmp_path, base, [adapter])
    reference = peft_merged(base, [adapter])
    assert reference.config.tie_word_embeddings is True
    _assert_same_model(out, reference)
    assert HEAD not in shard_files(out)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()


@pytest.mark.parametrize("offset", [0.0, 0.01], ids=["equal-one-matrix", "different-two-matrices"])
@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_module_whose_head_is_also_stored_merges_as_peft(tmp_path, offset, target):
    base = _store_head(tmp_path, _tied_base(tmp_path), offset)
    adapter = _adapter(tmp_path, base, target_modules=[target, "q_proj"])
    out = _merge(tmp_path, base, [adapter])
    _assert_same_model(out, peft_merged(base, [adapter]))
    merged = load_tensors(out)
    assert torch.equal(merged[HEAD], merged[EMBED]) == (offset == 0.0), "one matrix stays one, two stay two"


def test_modules_to_save_head_on_a_stored_equal_alias_unties_it(tmp_path):
    base = _store_head(tmp_path, _tied_base(tmp_path), 0.0)
    adapter = _adapter(tmp_path, base, target_modules=["q_proj"], modules_to_save=["lm_head"])
    out = _merge(tmp_path, base, [adapter])
    _assert_same_model(out, peft_merged(base, [adapter]))


def test_two_different_replacements_of_one_tensor_are_refused(tmp_path):
    base = _tied_base(tmp_path)
    first = _adapter(tmp_path, base, "first", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    second = _adapter(tmp_path, base, "second", seed=2, target_modules=["k_proj"], modules_to_save=["lm_head"])
    with pytest.raises(shardmerge.ShardmergeError, match="both replace 'lm_head.weight' with different values"):
        _merge(tmp_path, base, [first, second])
    assert not (tmp_path / "merged" / INDEX_NAME).exists()
