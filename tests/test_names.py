"""Name matching between adapters (module names) and base checkpoints (stored names).

The built-in renaming table must say what transformers' own conversion mapping says, for every family in
it; without transformers the table alone gives the same merge; a name that the renaming rules send to two
stored tensors is refused with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.models import INDEX_NAME, add_tensor, load_tensors, sha256, shard_files
from helpers.plans import run_cli, write_plan
from helpers.vlm import build_vlm, make_vlm_adapter

import shardmerge
from shardmerge import names

# The architecture transformers builds for each family of the built-in table, with config overrides that keep
# the meta-device model small (the rules do not depend on sizes).
FAMILY_MODELS = {
    "llava": ("llava", "LlavaForConditionalGeneration", {}),
    "vipllava": ("vipllava", "VipLlavaForConditionalGeneration", {}),
    "aya_vision": ("aya_vision", "AyaVisionForConditionalGeneration", {"vision_config": {"num_attention_heads": 16}}),
    "mistral3": ("mistral3", "Mistral3ForConditionalGeneration", {}),
    "gemma3": ("gemma3", "Gemma3ForConditionalGeneration", {}),
    "paligemma": ("paligemma", "PaliGemmaForConditionalGeneration", {}),
    "internvl": ("internvl", "InternVLForConditionalGeneration", {}),
    "mllama": ("mllama", "MllamaForConditionalGeneration", {"text_config": {"cross_attention_layers": [1]}}),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration", {}),
    "llava_next_video": ("llava_next_video", "LlavaNextVideoForConditionalGeneration", {}),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration", {}),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration", {"vision_config": {"depth": 2}}),
    "Qwen2_5_VLForConditionalGeneration": (
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", {"vision_config": {"depth": 2}}),
    "mixtral": ("mixtral", "MixtralForCausalLM", {"num_hidden_layers": 2, "num_local_experts": 2}),
}  # fmt: skip
# A family's nested text model brings its own rules, scoped to where the family puts it.
EXTRA_MODELS = {"llava-with-mixtral-text": ("llava", "LlavaForConditionalGeneration", {
    "text_config": {"model_type": "mixtral", "num_local_experts": 2}})}  # fmt: skip


def _config(model_type: str, architecture: str, overrides: dict) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict):
            sub = dict(config.get(key) or {})
            if "model_type" in value and value["model_type"] != sub.get("model_type"):
                sub = AutoConfig.for_model(value["model_type"]).to_dict()
            config[key] = {**sub, **value}
        else:
            config[key] = value
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("num_hidden_layers", 0) > 2:
        text["num_hidden_layers"] = 2
        if isinstance(text.get("layer_types"), list):
            text["layer_types"] = text["layer_types"][:2]
    config["architectures"] = [architecture]
    return config


def _checkpoint_layouts(config: dict, architecture: str) -> tuple[dict[str, str | None], bool, list]:
    """{stored key: module key} as save_pretrained writes a Hub-loaded model (prefix changes reverted too) and
    a model built from scratch, whether the model also has converters (stored keys of fused tensors then map
    to no single module key: None), and transformers' own renaming objects for it."""
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, revert_weight_conversion

    model_config = transformers.AutoConfig.for_model(config["model_type"]).from_dict(config)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(model_config)
    state = model.state_dict()
    module_of = {id(t): k for k, t in state.items()}  # renaming passes the very tensor objects through
    layouts = {}
    for hub in (False, True):
        if hub:
            model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
        for stored, tensor in revert_weight_conversion(model, dict(state)).items():
            layouts[stored] = module_of.get(id(tensor))
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    return layouts, any(isinstance(c, WeightConverter) for c in conversions), renamings


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS) + sorted(EXTRA_MODELS))
def test_builtin_table_renames_as_transformers_does(family):
    model_type, architecture, overrides = {**FAMILY_MODELS, **EXTRA_MODELS}[family]
    config = _config(model_type, architecture, overrides)
    ours, theirs = names._table_renames(config), names.checkpoint_renames(config)
    assert ours is not None and ours.source == "built-in table"
    assert theirs is not None and theirs.source.startswith("transformers"), "transformers has no rules for it?"
    layouts, converts, renamings = _checkpoint_layouts(config, architecture)
    legacy = {"model.language_model.model." + k.removeprefix("model.language_model.")
              for k in layouts.values() if k and k.startswith("model.language_model.")}  # fmt: skip
    keys = sorted(set(layouts) | {m for m in layouts.values() if m} | legacy)
    assert any(module and stored != module for stored, module in layouts.items()), "nothing renamed: a vacuous case"
    from transformers.core_model_loading import apply_renamings

    native = {k: apply_renamings(k, renamings) for k in keys}  # transformers' own objects, as its loader runs them
    differ = [f"{k}: table {ours.to_module(k)!r}, transformers' rules {theirs.to_module(k)!r}, native {native[k]!r}"
              for k in keys if not ours.to_module(k) == theirs.to_module(k) == native[k]]  # fmt: skip
    assert not differ, "\n".join(differ[:10])
    if not converts:  # each stored key lands on its module key (fused experts are the moe converters' business)
        wrong = [f"{s} -> {ours.to_module(s)}, not {m}" for s, m in layouts.items() if ours.to_module(s) != m]
        assert None not in layouts.values()
        assert not wrong, "\n".join(wrong[:10])


def test_every_family_of_the_builtin_table_is_checked_against_transformers():
    assert set(FAMILY_MODELS) == set(names._FAMILIES)


def test_transformers_rules_come_from_a_child_process_that_keeps_transformers_out_of_the_merging_one(llava):
    _, base, _ = llava
    code = ("import json, sys; from shardmerge.sources import read_base; from shardmerge.names import BaseNames; "
            "names = BaseNames(read_base(sys.argv[1])); "
            "found, how = names.candidates('model.language_model.layers.0.self_attn.q_proj.weight'); "
            "print(json.dumps([found, how, names.renames.source, 'transformers' in sys.modules]))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    found, how, source, imported = json.loads(result.stdout)
    assert (found, how) == (["language_model.model.layers.0.self_attn.q_proj.weight"], "renamed")
    assert source.startswith("transformers") and not imported


def test_a_model_without_conversion_rules_has_no_renames():
    assert names.checkpoint_renames({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None


def _merge(base, adapter, output):
    shardmerge.merge({"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(output), "device": "cpu"})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base = build_vlm(root / "base", "llava", torch.bfloat16)
    return root, base, make_vlm_adapter(base, root / "adapter", "llava", torch.bfloat16)


def test_without_transformers_the_builtin_table_gives_the_same_merge(llava, monkeypatch):
    root, base, adapter = llava
    _merge(base, adapter, root / "with-transformers")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    config = json.loads((base / "config.json").read_text())
    assert names.checkpoint_renames(config).source == "built-in table"
    _merge(base, adapter, root / "built-in")
    for shard in sorted(set(shard_files(base).values())):
        assert (root / "built-in" / shard).read_bytes() == (root / "with-transformers" / shard).read_bytes(), shard


def test_a_name_the_renames_send_to_two_stored_tensors_is_refused_in_one_line(llava, tmp_path):
    _, hub_base, adapter = llava
    base = tmp_path / "base"
    base.mkdir()
    for f in hub_base.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    # the same weight also stored in the layout transformers 5.10-5.23 wrote for some models
    stored, duplicate = ("language_model.model.layers.0.self_attn.q_proj.weight",
                         "model.language_model.model.layers.0.self_attn.q_proj.weight")  # fmt: skip
    add_tensor(base, duplicate, load_tensors(base)[stored].clone(), beside=stored)
    before = {p.name: sha256(p) for p in [*base.iterdir(), *adapter.iterdir()]}
    plan = write_plan(tmp_path / "plan.yaml", base=base, adapters=[adapter], output=tmp_path / "out", device="cpu")
    result = run_cli(plan, process=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in ("adapter_model.safetensors", stored, duplicate, "more than one layout"):
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert before == {p.name: sha256(p) for p in [*base.iterdir(), *adapter.iterdir()]}, "inputs were modified"


def test_a_config_claiming_more_layers_than_the_checkpoint_has_tensors_is_not_built():
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "text_config": {"model_type": "llama", "num_hidden_layers": 10**9}}  # fmt: skip
    assert names.checkpoint_renames(config, max_layers=1000).source == "built-in table"


def test_an_architecture_name_that_is_not_a_transformers_model_falls_back_to_the_table():
    config = {"model_type": "llava", "architectures": ["os"]}
    assert names.checkpoint_renames(config).source == "built-in table"
