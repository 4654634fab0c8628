"""adapter_config.json read as PEFT 0.21.2 reads it: inits that rewrite the base, config/tensor disagreements,
the variants that merge like plain LoRA, and what PEFT refuses. Each merge is compared with PEFT's
merge_and_unload at model level; each refusal is one line on stderr, a non-zero exit, no complete-looking
output and untouched inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter, resolve_adapter_dir
from helpers.models import INDEX_NAME, build_base, tree_hashes
from helpers.plans import run_cli, write_plan
from helpers.reference import assert_same_model, peft_merged
from safetensors.torch import load_file, save_file

import shardmerge

LAYERS = (0, 1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("config") / "base", "llama", torch.float32)


def _adapter(tmp_path: Path, base: Path, name: str = "adapter", **lora) -> Path:
    from peft import LoraConfig

    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    return make_adapter(base, tmp_path / name, LoraConfig(r=4, lora_alpha=8, **lora), dtype=torch.float32)


def _edit_config(adapter: Path, **changes) -> None:
    path = resolve_adapter_dir(adapter) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(adapter: Path, edit) -> None:
    path = resolve_adapter_dir(adapter) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _merge(tmp_path: Path, base: Path, *adapters: Path) -> Path:
    out = tmp_path / "merged"
    shardmerge.merge({"base": str(base), "adapters": [str(a) for a in adapters], "output": str(out), "device": "cpu"})
    return out


def _assert_refused(tmp_path: Path, base: Path, adapters: list[Path], *needles: str) -> None:
    before = tree_hashes(base, *adapters)
    out = tmp_path / "refused"
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=adapters, output=out, device="cpu")
    result = run_cli(plan, "-q")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (out / INDEX_NAME).exists() and not (out / "shardmerge-manifest.json").exists()
    assert tree_hashes(base, *adapters) == before, "inputs changed"


# -- init_lora_weights ------------------------------------------------------------------------------------


def test_unconverted_pissa_is_refused_naming_the_init_and_the_conversion(tmp_path, base):
    adapter = _adapter(tmp_path, base, init_lora_weights="pissa")
    _assert_refused(tmp_path, base, [adapter], "init_lora_weights='pissa'", "path_initial_model_for_weight_conversion")


@pytest.mark.parametrize("init", ["olora", "corda", "loftq", "pissa_niter_4"])
def test_other_inits_that_rewrite_the_base_are_refused(tmp_path, base, init):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, init_lora_weights=init)
    with pytest.raises(shardmerge.ShardmergeError, match=f"init_lora_weights='{init}' was saved unconverted"):
        _merge(tmp_path, base, adapter)
    assert not (tmp_path / "merged" / INDEX_NAME).exists()


def test_pissa_converted_with_path_initial_model_merges_as_peft(tmp_path, base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), config)
    model.peft_config["default"].init_lora_weights = True  # what PEFT's docs do before saving the initial adapter
    model.save_pretrained(str(tmp_path / "initial"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    out = _merge(tmp_path, base, tmp_path / "converted")
    assert_same_model(out, peft_merged(base, [tmp_path / "converted"]))


def test_lora_ga_merges_as_peft_and_warns(tmp_path, base, capsys):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, init_lora_weights="lora_ga")
    out = _merge(tmp_path, base, adapter)
    assert_same_model(out, peft_merged(base, [adapter]))
    assert "init_lora_weights='lora_ga'" in capsys.readouterr().err


# -- config and tensors that disagree: PEFT follows the config ---------------------------------------------


def test_magnitude_vectors_with_use_dora_false_are_ignored_as_peft(tmp_path, base, capsys):
    adapter = _adapter(tmp_path, base, use_dora=True)
    _edit_config(adapter, use_dora=False)
    out = _merge(tmp_path, base, adapter)
    assert_same_model(out, peft_merged(base, [adapter]))
    assert "use_dora is false" in capsys.readouterr().err


def test_use_dora_true_without_magnitude_vectors_is_refused_naming_both(tmp_path, base):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, use_dora=True)
    _assert_refused(tmp_path, base, [adapter], "lora_magnitude_vector", "use_dora: true", "adapter_model.safetensors")


def test_a_lora_tensor_under_a_name_peft_does_not_save_is_refused_naming_it(tmp_path, base):
    adapter = _adapter(tmp_path, base)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight.extra"
    _edit_tensors(adapter, lambda tensors: tensors.update({key: torch.zeros(4, 32)}))
    _assert_refused(tmp_path, base, [adapter], "cannot interpret adapter tensor", key)


def test_lora_b_bias_with_lora_bias_false_is_ignored_as_peft(tmp_path, base):
    adapter = _adapter(tmp_path, base, target_modules=["q_proj"], lora_bias=True)
    _edit_config(adapter, lora_bias=False)
    out = _merge(tmp_path, base, adapter)
    assert_same_model(out, peft_merged(base, [adapter]))


def _add_lora_for(module: str):
    def edit(tensors):
        for layer in LAYERS:
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, 32) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(16 if "k_proj" in module else 32, 4) * 0.3

    return edit


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"]),
        dict(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]),
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
    ],
    ids=["not-targeted", "excluded", "outside-layers-to-transform"],
)
def test_tensors_for_modules_peft_would_not_create_are_ignored_as_peft(tmp_path, base, lora, capsys):
    adapter = _adapter(tmp_path, base, **{k: v for k, v in lora.items() if k != "layers_to_transform"})
    _edit_tensors(adapter, _add_lora_for("self_attn.k_proj"))
    _edit_config(adapter, **lora)
    out = _merge(tmp_path, base, adapter)
    assert_same_model(out, peft_merged(base, [adapter]))
    assert "ignoring" in capsys.readouterr().err


# -- variants that merge like plain LoRA -------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [dict(velora_config={}), dict(monteclora_config={}), dict(init_lora_weights="mica")],
    ids=["velora", "monteclora", "mica"],
)
def test_variants_whose_merge_is_plain_lora_merge_as_peft(tmp_path, base, variant):
    adapter = _adapter(tmp_path, base, **variant)
    out = _merge(tmp_path, base, adapter)
    assert_same_model(out, peft_merged(base, [adapter]))


# -- what PEFT refuses or cannot produce -------------------------------------------------------------------


def test_megatron_config_is_refused(tmp_path, base):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, megatron_config={"tensor_model_parallel_size": 2})
    _assert_refused(tmp_path, base, [adapter], "megatron_config")


def test_lora_and_trainable_tokens_on_one_embedding_are_refused(tmp_path, base):
    adapter = _adapter(tmp_path, base, target_modules=["q_proj"], trainable_token_indices=[3, 5])

    def add_embedding_lora(tensors):
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, 128)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(32, 4)

    _edit_tensors(adapter, add_embedding_lora)
    _edit_config(adapter, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(shardmerge.ShardmergeError, match="both LoRA and trainable tokens"):
        _merge(tmp_path, base, adapter)


def test_a_token_row_listed_twice_is_refused(tmp_path, base):
    adapter = _adapter(tmp_path, base, target_modules=["q_proj"], trainable_token_indices=[3, 5])
    _edit_config(adapter, trainable_token_indices=[3, 3])
    with pytest.raises(shardmerge.ShardmergeError, match="lists a token id twice"):
        _merge(tmp_path, base, adapter)


def test_overlapping_token_rows_of_two_adapters_are_refused(tmp_path, base):
    first = _adapter(tmp_path, base, "first", target_modules=["q_proj"], trainable_token_indices=[3, 5])
    second = _adapter(tmp_path, base, "second", target_modules=["v_proj"], trainable_token_indices=[5, 9])
    _assert_refused(tmp_path, base, [first, second], "token", "5")


# -- field types ----------------------------------------------------------------------------------------------
# PEFT would not build these configs, or would read them differently from what they say ("false" is true):
# each is one line naming adapter_config.json and the field, never an internal error or a guessed merge.
@pytest.mark.parametrize(
    "field",
    [
        {"target_modules": 3},
        {"target_modules": ["q_proj", 1]},
        {"modules_to_save": "lm_head"},
        {"layers_to_transform": "0"},
        {"layers_pattern": 5},
        {"target_parameters": 3},
        {"r": "four"},
        {"lora_alpha": None},
        {"lora_alpha": 10**400},  # JSON has no limit; more than a float holds
        {"rank_pattern": {"q_proj": "x"}},
        {"fan_in_fan_out": "false"},
        {"bias": "some"},
    ],
    ids=lambda field: next(iter(field)),
)
def test_a_config_field_of_the_wrong_type_is_refused_naming_the_file_and_the_field(tmp_path, base, field):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, **field)
    _assert_refused(tmp_path, base, [adapter], str(adapter / "adapter_config.json"), f"{next(iter(field))} must be")


def test_a_pattern_that_is_not_a_regular_expression_is_refused_naming_it(tmp_path, base):
    adapter = _adapter(tmp_path, base)
    _edit_config(adapter, alpha_pattern={"q_proj(": 3})
    _assert_refused(tmp_path, base, [adapter], str(adapter / "adapter_config.json"), "'q_proj(' is not a valid regular")
