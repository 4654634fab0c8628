"""Vision-language checkpoints: adapters name modules as the loaded model does, the base is stored in the
Hub's layout, and the merge still equals PEFT's, compared at model level.

Each family (LLaVA with a CLIP tower, Qwen2-VL, Gemma 3 and PaliGemma with SigLIP towers and tied
embeddings, Mistral 3 with a Pixtral tower) is a tiny random model saved in several bf16 shards in the Hub's
layout, with a LoRA adapter on the language model's attention and on the vision tower. The output is loaded
with AutoModelForImageTextToText and compared with PEFT's merge_and_unload(): every parameter, and the
logits on an image plus text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.adapters import write_adapter
from helpers.models import INDEX_NAME, load_tensors, shard_files, tensor_bytes
from helpers.vlm import TINY_VLMS, VLMReference, build_vlm, load_vlm, logits, make_vlm_adapter, peft_vlm_reference
from safetensors import safe_open

import shardmerge

DTYPE = torch.bfloat16


@dataclass
class Built:
    base: Path
    adapter: Path
    output: Path
    ref: VLMReference


_BUILT: dict[str, Built] = {}


def merge(base: Path, adapter: Path, output: Path) -> None:
    shardmerge.merge({"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(output),
                      "device": "cpu", "max_memory": "64MiB"})  # fmt: skip


@pytest.fixture(params=sorted(TINY_VLMS))
def built(request, tmp_path_factory) -> tuple[str, Built]:
    family = request.param
    if family not in _BUILT:
        root = tmp_path_factory.mktemp(family)
        base = build_vlm(root / "base", family, DTYPE)
        adapter = make_vlm_adapter(base, root / "adapter", family, DTYPE)
        ref = peft_vlm_reference(base, adapter, family, DTYPE)
        merge(base, adapter, root / "merged")
        _BUILT[family] = Built(base, adapter, root / "merged", ref)
    return family, _BUILT[family]


def _adapter_modules(adapter: Path) -> set[str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def test_adapter_names_modules_that_the_checkpoint_stores_under_other_names(built):
    family, b = built
    modules = _adapter_modules(b.adapter)
    stored = set(shard_files(b.base))
    assert not {m + ".weight" for m in modules} & stored, "the case would not exercise renaming"
    tower = "model.visual." if family == "qwen2_vl" else "model.vision_tower."
    assert any(m.startswith(tower) for m in modules), "no LoRA on the vision tower"
    assert any(m.startswith("model.language_model.") for m in modules), "no LoRA on the language model"


def test_output_keeps_the_base_checkpoint_names_and_shards(built):
    _, b = built
    assert (b.output / INDEX_NAME).is_file()
    assert shard_files(b.output) == shard_files(b.base)


def test_every_parameter_matches_peft_merge_and_unload(built):
    _, b = built
    got = load_vlm(b.output, DTYPE).state_dict()
    want, base = b.ref.state, b.ref.base_state
    assert set(got) == set(want)
    eps = torch.finfo(DTYPE).eps
    failures = []
    for k in sorted(want):
        if k not in b.ref.lora_weights:
            if tensor_bytes(got[k]) != tensor_bytes(want[k]):
                failures.append(f"{k} changed though no LoRA layer touches it")
            continue
        g, w, w0 = got[k].double(), want[k].double(), base[k].double()
        # both round a float32 W + s*B@A to bf16; PEFT may round the delta first: a few ulps of |W|+|delta|
        tol = eps * (1.5 * w.abs() + w0.abs() + (w - w0).abs()) + 1e-30
        assert (0.1 * (w - w0).abs() > tol).double().mean() > 0.5, f"{k}: delta too small to test"
        if ((g - w).abs() > tol).any():
            failures.append(f"{k}: max|shardmerge - PEFT| = {(g - w).abs().max().item():.3g}")
    assert not failures, "\n".join(failures)
    assert any("vision_tower" in k or "visual" in k for k in b.ref.lora_weights)


def test_logits_on_image_and_text_match_peft(built):
    family, b = built
    got = logits(load_vlm(b.output, DTYPE), family)
    want = b.ref.logits
    atol = 2e-2 * max(want.abs().max().item(), 1.0)  # a few bf16 ulps of the largest logit
    moved = (want - b.ref.base_logits).abs().max().item()
    assert moved > 5 * atol, f"the adapter hardly moves the logits ({moved:.3g})"
    err = (got - want).abs().max().item()
    assert err <= atol, f"max|logits shardmerge - PEFT| = {err:.3g} > {atol:.3g}"


def test_tensors_no_lora_layer_touches_are_bit_identical_on_disk(built):
    _, b = built
    out, base = load_tensors(b.output), load_tensors(b.base)
    changed = sorted(k for k in base if tensor_bytes(out[k]) != tensor_bytes(base[k]))
    assert len(changed) == len(b.ref.lora_weights), changed


# Adapters trained before transformers 4.52 carry the checkpoint layout's names; the renaming rules take both
# sides to module names, so such an adapter merges exactly as its module-named twin.
CHECKPOINT_STYLE_PREFIXES = {
    "llava": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.vision_model.",
              "model.multi_modal_projector.": "multi_modal_projector."},
    "gemma3": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.vision_model."},
    "paligemma": {"model.language_model.": "language_model.model.",
                  "model.vision_tower.": "vision_tower.vision_model."},
    "mistral3": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
                 "model.multi_modal_projector.": "multi_modal_projector."},
    "qwen2_vl": {"model.language_model.": "model.", "model.visual.": "visual."},
}  # fmt: skip


def test_an_adapter_with_checkpoint_layout_names_merges_like_its_module_named_twin(built, tmp_path):
    from safetensors.torch import load_file

    family, b = built
    renamed = {}
    for key, tensor in load_file(str(b.adapter / "adapter_model.safetensors")).items():
        name = key.removeprefix("base_model.model.")
        for new, old in CHECKPOINT_STYLE_PREFIXES[family].items():
            if name.startswith(new):
                name = old + name.removeprefix(new)
                break
        else:
            raise AssertionError(f"{key}: no checkpoint-style prefix for it")
        renamed["base_model.model." + name] = tensor
    config = json.loads((b.adapter / "adapter_config.json").read_text())
    old_style = write_adapter(tmp_path / "adapter", renamed, **config)
    merge(b.base, old_style, tmp_path / "merged")
    for shard in sorted(set(shard_files(b.base).values())):
        assert (tmp_path / "merged" / shard).read_bytes() == (b.output / shard).read_bytes(), shard
