"""shardmerge's output equals PEFT's own merge (merge_and_unload + save_pretrained), case by case.

Each case is a tiny random base model saved in several shards plus one or more random PEFT adapters
(every LoRA tensor non-zero). A case is built, merged by shardmerge and merged by PEFT once per
session; each test below checks one behaviour on every case:

* the output keeps the base's shard files, index and side files,
* it holds the same tensor names, shapes and dtypes as PEFT's saved merge,
* tensors no adapter touches are bit-identical to the base,
* tensors an adapter replaces (modules_to_save, trained biases) are bit-identical to PEFT's copy,
* merged tensors agree with PEFT's up to low-precision rounding,
* their error against an exact float64 merge is no larger than PEFT's own,
* the output loads with transformers and its logits match PEFT's merged model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers.adapters import make_adapter
from helpers.models import (
    DTYPES,
    INDEX_NAME,
    LLAMA_ALL_LINEAR,
    build_base,
    load_tensors,
    shard_files,
    tensor_bytes,
    tiny_config,
)
from helpers.reference import PeftReference, float64_slack, input_ids, peft_reference, rounding_tolerance

import shardmerge

# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    lora: dict  # LoraConfig keyword arguments
    weight: float = 1.0  # plan weight
    name: str = "default"  # adapter name given to PEFT (non-default: saved under dir/<name>/)
    in_model_dtype: bool = False  # save LoRA tensors in the model dtype instead of PEFT's float32
    seed: int = 1
    std: float = 0.1  # LoRA tensors ~ N(0, std^2)
    mutate: Callable[[dict], None] | None = None  # edit the saved adapter tensors


@dataclass(frozen=True)
class Case:
    id: str
    adapters: tuple[AdapterSpec, ...]
    arch: str = "llama"
    dtype: str = "bfloat16"
    tie: bool = False
    replaces: bool = False  # the adapters replace some tensors outright (PEFT copies them)
    max_memory: str = "64MiB"  # shardmerge's host budget (a tight one forces row-block tiles)


def _perturb_saved_embedding_base_layer(sd: dict) -> None:
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in sd, sorted(sd)
    sd[key] = sd[key] + 0.01


CASES = [
    # PEFT default: LoRA tensors held and saved in float32, so PEFT adds in float32 and rounds once
    Case("llama-all-linear-bf16", (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL_LINEAR)),)),
    # adapters trained in the model dtype: PEFT rounds the delta to bf16/fp16, then adds in bf16/fp16
    Case(
        "llama-all-linear-bf16-adapter-in-bf16",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL_LINEAR), in_model_dtype=True),),
    ),
    Case(
        "llama-all-linear-fp16-adapter-in-fp16",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL_LINEAR), in_model_dtype=True),),
        dtype="float16",
    ),
    Case(
        "llama-all-linear-fp32",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL_LINEAR)),),
        dtype="float32",
    ),
    Case(
        "rslora",
        (AdapterSpec(dict(r=16, lora_alpha=8, use_rslora=True, target_modules=LLAMA_ALL_LINEAR)),),
    ),
    Case(
        "rank-pattern-and-alpha-pattern",
        (
            AdapterSpec(
                dict(
                    r=4,
                    lora_alpha=8,
                    target_modules=LLAMA_ALL_LINEAR,
                    # first matching pattern wins: layer 0's q_proj gets 6, layer 1's gets 2
                    rank_pattern={"model.layers.0.self_attn.q_proj": 6, "q_proj": 2, "layers.1.mlp.down_proj": 12},
                    alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.up_proj": 3},
                )
            ),
        ),
    ),
    Case(
        "layers-to-transform",
        (
            AdapterSpec(
                dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])
            ),
        ),
    ),
    Case(
        "dora-linear",
        (AdapterSpec(dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),),
    ),
    Case(
        "dora-embedding",
        (AdapterSpec(dict(r=8, lora_alpha=16, use_dora=True, target_modules=["embed_tokens"])),),
    ),
    Case(
        "lora-embedding",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"])),),
    ),
    # PEFT saves the targeted embedding's base layer inside the adapter and loads it over the base's
    # embedding; here that copy differs from the base, so the merge must start from the adapter's copy
    Case(
        "lora-embedding-adapter-carries-modified-base-layer",
        (
            AdapterSpec(
                dict(r=8, lora_alpha=16, target_modules=["embed_tokens"]), mutate=_perturb_saved_embedding_base_layer
            ),
        ),
    ),
    Case(
        "modules-to-save",
        (
            AdapterSpec(
                dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "model.norm"])
            ),
        ),
        replaces=True,
    ),
    # tie_word_embeddings: the checkpoint stores model.embed_tokens.weight only; PEFT's merge adds the
    # lm_head delta (and the embed_tokens delta) to that one shared tensor
    Case(
        "tied-embeddings-lora-on-lm-head",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj"])),),
        tie=True,
    ),
    Case(
        "tied-embeddings-lora-on-embed-tokens-and-lm-head",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head"])),),
        tie=True,
    ),
    # GPT-2 Conv1D stores (in, out); attn.c_proj is square (32x32) and must still be transposed
    Case(
        "gpt2-conv1d-c-attn-and-square-c-proj",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),),
        arch="gpt2",
    ),
    Case(
        "qwen2-trained-biases-bias-all",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="all")),),
        arch="qwen2",
        replaces=True,
    ),
    Case(
        "llama-attention-bias-trained-biases-lora-only",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], bias="lora_only")),),
        arch="llama_bias",
        replaces=True,
    ),
    Case(
        "qwen2-lora-bias",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),),
        arch="qwen2",
    ),
    Case(
        "phi3-fused-qkv-and-gate-up",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),),
        arch="phi3",
    ),
    Case(
        "two-adapters-weights-0.7-and-minus-0.4",
        (
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"]), weight=0.7, seed=1),
            AdapterSpec(
                dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "down_proj"]), weight=-0.4, seed=2, std=0.2
            ),
        ),
    ),
    # a budget smaller than the embedding / lm_head tensors: merged in row blocks, same result
    Case(
        "row-tiled-in-a-16KiB-budget-fp32",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL_LINEAR + ["embed_tokens", "lm_head"])),),
        dtype="float32",
        max_memory="16400KiB",  # 16 MiB of fixed run overhead + 16 KiB of buffers
    ),
    Case(
        "non-default-adapter-name",
        (AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), name="myname"),),
    ),
]
CASE_IDS = [c.id for c in CASES]
CASES_BY_ID = {c.id: c for c in CASES}


# --------------------------------------------------------------------------------------------------
# building, merging, caching (once per case per session)
# --------------------------------------------------------------------------------------------------


@dataclass
class Built:
    case: Case
    base_dir: Path
    adapter_paths: list[Path]
    output_dir: Path
    ref: PeftReference
    error: BaseException | None = None
    out: dict = field(default_factory=dict)


_BUILT: dict[str, Built] = {}


def _build(case: Case, root: Path) -> Built:
    from peft import LoraConfig

    dtype = DTYPES[case.dtype]
    base_dir = build_base(root / "base", case.arch, dtype, tie=case.tie)
    paths = []
    for i, spec in enumerate(case.adapters):
        paths.append(
            make_adapter(
                base_dir,
                root / f"adapter{i}",
                LoraConfig(**spec.lora),
                dtype=dtype,
                seed=spec.seed,
                std=spec.std,
                adapter_name=spec.name,
                adapter_in_model_dtype=spec.in_model_dtype,
                mutate_state_dict=spec.mutate,
            )
        )
    ref = peft_reference(
        base_dir,
        [(p, s.weight) for p, s in zip(paths, case.adapters)],
        dtype=dtype,
        work_dir=root,
        autocast_adapter_dtype=not any(s.in_model_dtype for s in case.adapters),
    )
    built = Built(case, base_dir, paths, root / "merged", ref)
    plan = {
        "base": str(base_dir),
        "adapters": [{"path": str(p), "weight": s.weight} for p, s in zip(paths, case.adapters)],
        "output": str(built.output_dir),
        "device": "cpu",
        "dtype": "keep",
        "max_memory": case.max_memory,
    }
    try:
        shardmerge.merge(plan)
        built.out = load_tensors(built.output_dir)
    except BaseException as e:  # noqa: BLE001 - re-raised by every test of this case
        built.error = e
    return built


@pytest.fixture
def built(request, tmp_path_factory) -> Built:
    case = CASES_BY_ID[request.param]
    if case.id not in _BUILT:
        _BUILT[case.id] = _build(case, tmp_path_factory.mktemp(case.id))
    b = _BUILT[case.id]
    if b.error is not None:
        raise AssertionError(f"shardmerge.merge failed on case {case.id}: {b.error!r}") from b.error
    return b


def per_case(cases=CASES):
    return pytest.mark.parametrize("built", [c.id for c in cases], indirect=True)


def _fmt_keys(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------
# one behaviour per test, on every case
# --------------------------------------------------------------------------------------------------


@per_case()
def test_output_keeps_the_base_shard_files_index_and_side_files(built: Built):
    base_map = shard_files(built.base_dir)
    assert (built.output_dir / INDEX_NAME).is_file(), "sharded base but no index in the output"
    out_map = shard_files(built.output_dir)
    assert sorted(set(out_map.values())) == sorted(set(base_map.values())), "shard file names differ from the base"
    assert out_map == base_map, "tensors moved between shard files"
    side = sorted(p.name for p in built.base_dir.iterdir() if p.suffix != ".safetensors" and p.name != INDEX_NAME)
    assert side, "the base has config files"
    for name in side:
        assert (built.output_dir / name).is_file(), f"{name} not copied to the output"
        assert (built.output_dir / name).read_bytes() == (built.base_dir / name).read_bytes(), f"{name} changed"


@per_case()
def test_tensor_names_shapes_and_dtypes_match_peft_saved_merge(built: Built):
    out, ref = built.out, built.ref.files
    assert set(out) == set(ref), (
        f"only in shardmerge: [{_fmt_keys(set(out) - set(ref))}]; only in PEFT: [{_fmt_keys(set(ref) - set(out))}]"
    )
    bad = [
        f"{k}: {tuple(out[k].shape)} {out[k].dtype} vs PEFT {tuple(ref[k].shape)} {ref[k].dtype}"
        for k in sorted(out)
        if out[k].shape != ref[k].shape or out[k].dtype != ref[k].dtype
    ]
    assert not bad, "; ".join(bad)


@per_case()
def test_tensors_no_adapter_touches_are_bit_identical_to_base(built: Built):
    ref = built.ref
    untouched = sorted(set(ref.base) - ref.touched)
    assert untouched, "every tensor touched?"
    # the reference agrees that these are untouched
    assert all(tensor_bytes(ref.files[k]) == tensor_bytes(ref.base[k]) for k in untouched)
    missing = [k for k in untouched if k not in built.out]
    assert not missing, f"missing from output: {_fmt_keys(missing)}"
    changed = [k for k in untouched if tensor_bytes(built.out[k]) != tensor_bytes(ref.base[k])]
    assert not changed, f"changed though no adapter touches them: {_fmt_keys(changed)}"


@per_case([c for c in CASES if c.replaces])
def test_tensors_an_adapter_replaces_are_bit_identical_to_peft_copy(built: Built):
    ref = built.ref
    assert ref.replaced, "the case should replace tensors (modules_to_save / trained biases)"
    wrong = []
    for k in sorted(ref.replaced):
        if k not in built.out:
            wrong.append(f"{k} missing")
        elif tensor_bytes(built.out[k]) != tensor_bytes(ref.files[k]):
            d = (built.out[k].double() - ref.files[k].double()).abs().max().item()
            same_as_base = tensor_bytes(built.out[k]) == tensor_bytes(ref.base[k])
            wrong.append(f"{k} max|diff|={d:.3g}{' (still the base tensor)' if same_as_base else ''}")
    assert not wrong, "; ".join(wrong)


@per_case()
def test_merged_tensors_match_peft_within_rounding(built: Built):
    ref, dtype = built.ref, DTYPES[built.case.dtype]
    assert ref.exact, "the case merges some LoRA delta"
    failures = []
    for k in sorted(ref.exact):
        got, want = built.out[k].double(), ref.files[k].double()
        tol = rounding_tolerance(dtype, want, ref.mag[k], ref.steps[k])
        err = (got - want).abs()
        # the check has teeth: a 10% error in the delta would exceed the tolerance on most elements
        assert (0.1 * ref.delta[k] > tol).double().mean() > 0.5, f"{k}: delta too small to test"
        if (err > tol).any():
            i = int(torch.argmax(err - tol))
            failures.append(
                f"{k}: max|shardmerge-PEFT|={err.max().item():.3g} "
                f"(tol at worst element {tol.flatten()[i].item():.3g}), "
                f"max|PEFT-base|={ref.delta[k].max().item():.3g}, "
                f"max|shardmerge-base|={(got - ref.base[k].double()).abs().max().item():.3g}"
            )
    assert not failures, "\n".join(failures)


@per_case()
def test_merged_error_vs_float64_is_no_larger_than_peft(built: Built):
    ref, dtype = built.ref, DTYPES[built.case.dtype]
    failures = []
    for k in sorted(ref.exact):
        exact = ref.exact[k]
        err_sm = (built.out[k].double() - exact).abs().max().item()
        err_peft = (ref.files[k].double() - exact).abs().max().item()
        slack = float64_slack(dtype, exact, ref.mag[k])
        if err_sm > err_peft + slack:
            failures.append(f"{k}: max|shardmerge-f64|={err_sm:.3g} > max|PEFT-f64|={err_peft:.3g} (+{slack:.2g})")
    assert not failures, "\n".join(failures)


@per_case()
def test_output_loads_with_transformers_and_logits_match_peft(built: Built):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[built.case.dtype]
    model = AutoModelForCausalLM.from_pretrained(str(built.output_dir), dtype=dtype)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids()).logits.float()
    want = built.ref.logits
    scale = want.abs().max().item()
    atol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype] * max(scale, 1.0)
    moved = (want - built.ref.base_logits).abs().max().item()
    assert moved > 5 * atol, f"the adapter hardly changes the logits ({moved:.3g}); the check would be vacuous"
    err = (logits - want).abs().max().item()
    assert err <= atol, f"max|logits shardmerge - PEFT| = {err:.3g} > {atol:.3g} (adapter moves logits by {moved:.3g})"


# --------------------------------------------------------------------------------------------------
# bad input is refused
# --------------------------------------------------------------------------------------------------


def _make(tmp_path, arch="llama", **lora):
    from peft import LoraConfig

    base = build_base(tmp_path / f"base-{arch}", arch, torch.bfloat16)
    adapter = make_adapter(base, tmp_path / f"adapter-{arch}", LoraConfig(**lora), dtype=torch.bfloat16)
    return base, adapter


def test_adapter_for_another_architecture_is_refused_without_complete_output(tmp_path):
    llama, _ = _make(tmp_path, "llama", r=4, target_modules=["q_proj"])
    _, gpt2_adapter = _make(tmp_path, "gpt2", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    out = tmp_path / "merged"
    with pytest.raises(shardmerge.ShardmergeError):
        shardmerge.merge(
            {"base": str(llama), "adapters": [{"path": str(gpt2_adapter)}], "output": str(out), "device": "cpu"}
        )
    assert not (out / INDEX_NAME).exists(), "a refused merge left an index (looks complete)"


def test_adapter_whose_shapes_do_not_fit_the_base_is_refused(tmp_path):
    from peft import LoraConfig

    base = build_base(tmp_path / "base", "llama", torch.bfloat16)
    # same architecture and tensor names, but trained on a model with other projection sizes
    cfg = tiny_config("llama")
    cfg.intermediate_size = 48
    other = build_base(tmp_path / "other", cfg, torch.float32, min_shards=1)
    adapter = make_adapter(
        other, tmp_path / "adapter", LoraConfig(r=4, target_modules=["gate_proj"]), dtype=torch.float32
    )
    out = tmp_path / "merged"
    with pytest.raises(shardmerge.ShardmergeError, match="gate_proj"):
        shardmerge.merge({"base": str(base), "adapters": [{"path": str(adapter)}], "output": str(out), "device": "cpu"})
    assert not (out / INDEX_NAME).exists(), "a refused merge left an index (looks complete)"
