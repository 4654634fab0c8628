"""PEFT's merge as the reference, per tensor and at model level.

`peft_reference` produces three references for a (base, adapters, plan weights) case:

* PEFT's own merge: the base loaded with transformers, every adapter loaded into one PeftModel, all of
  them activated together, plan weights applied by multiplying each adapter's `scaling` (which scales
  both `B @ A` and a trained `lora_B.bias`), then `merge_and_unload()` and `save_pretrained()`. The
  saved files are what a user of PEFT + transformers would get.
* A float64 merge computed from the same loaded tensors, `W + sum_i w_i * s_i * delta_i` with PEFT's
  orientation per layer kind (and DoRA's renormalisation), for every tensor a LoRA delta touches.
* The set of tensors an adapter replaces outright (modules_to_save, trained biases, an embedding base
  layer saved inside the adapter): PEFT copies those, so the merge must too.

`peft_merged` and `assert_same_model` compare at model level, for outputs whose on-disk names or layout
differ from PEFT's save: load with the right Auto class, compare every parameter and the logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.adapters import resolve_adapter_dir
from helpers.models import VOCAB, load_tensors, quiet, tensor_bytes


@dataclass
class PeftReference:
    """What PEFT makes of a case, plus an exact float64 merge of the LoRA-touched tensors."""

    model: torch.nn.Module  # PEFT's merged model (merge_and_unload), eval mode
    files: dict[str, torch.Tensor]  # what save_pretrained writes for it: stored name -> tensor
    base: dict[str, torch.Tensor]  # the base checkpoint's tensors
    exact: dict[str, torch.Tensor]  # float64 merge of every tensor a LoRA delta touches
    delta: dict[str, torch.Tensor]  # float64 |total change| of those tensors
    mag: dict[str, torch.Tensor]  # float64 bound on every intermediate |value| PEFT rounds (tolerances)
    steps: dict[str, int]  # how many deltas PEFT adds (and rounds) into each of those tensors
    replaced: set[str]  # tensors the adapters replace outright (PEFT copies them)
    logits: torch.Tensor  # merged model's logits on INPUT_IDS, float32
    base_logits: torch.Tensor  # base model's logits on INPUT_IDS, float32
    adapter_configs: list[dict] = field(default_factory=list)

    @property
    def touched(self) -> set[str]:
        return set(self.exact) | self.replaced


def input_ids() -> torch.Tensor:
    """A fixed batch of token ids for logits checks."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids()).logits.float()


def _stored_name(module_path: str, param: torch.Tensor, peft_model, stored: set[str], leaf: str) -> str:
    """The checkpoint name of a LoRA layer's base parameter (`leaf` is "weight" or "bias").

    Usually `<module>.weight` with PEFT's prefix and `.base_layer` removed; for a tied parameter that
    the checkpoint stores under another name (lm_head of a tied model), the aliased stored name.
    """
    plain = module_path.removeprefix("base_model.model.") + "." + leaf
    if plain in stored:
        return plain
    for name, p in peft_model.named_parameters(remove_duplicate=False):
        if p is param:
            cand = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if cand in stored:
                return cand
    raise KeyError(f"no stored tensor for {plain}")


def _lora_delta64(module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """s * delta in float64 for one adapter on one LoRA layer, in the stored weight's orientation, and
    |s| * |B| @ |A| (the scale of the float32 summation noise in computing it)."""
    from peft.tuners.lora import layer as lora_layer

    s = float(module.scaling[name])
    if isinstance(module, lora_layer.Embedding):
        A = module.lora_embedding_A[name].detach().double()  # (r, vocab)
        B = module.lora_embedding_B[name].detach().double()  # (dim, r)
        return (B @ A).T * s, (B.abs() @ A.abs()).T * abs(s)  # (vocab, dim)
    if isinstance(module, lora_layer.Linear):
        A = module.lora_A[name].weight.detach().double()  # (r, in)
        B = module.lora_B[name].weight.detach().double()  # (out, r)
        d, m = (B @ A) * s, (B.abs() @ A.abs()) * abs(s)
        return (d.T, m.T) if module.fan_in_fan_out else (d, m)
    raise NotImplementedError(f"float64 reference for {type(module).__name__}")


def _dora64(module, name: str, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA merge in float64: m * (W + sΔ) / ‖W + sΔ‖.

    The norm is per output feature: per row of a Linear weight (out, in), per column of a Conv1D
    weight stored (in, out), and per embedding dimension (column) of an Embedding weight (vocab, dim).
    """
    from peft.tuners.lora import layer as lora_layer

    m = module.lora_magnitude_vector[name].weight.detach().double()
    V = W + delta
    if isinstance(module, lora_layer.Embedding) or getattr(module, "fan_in_fan_out", False):
        return V * (m / torch.linalg.norm(V, dim=0)).view(1, -1)
    return V * (m / torch.linalg.norm(V, dim=1)).view(-1, 1)


def peft_reference(
    base_dir: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    *,
    dtype: torch.dtype,
    work_dir: str | os.PathLike,
    autocast_adapter_dtype: bool = True,
) -> PeftReference:
    """PEFT's merge of `adapters` (path, plan weight) into the base, and a float64 reference.

    autocast_adapter_dtype is passed to PEFT's loaders. True (PEFT's default) holds LoRA weights in
    float32, so PEFT computes W + delta in float32 and rounds once. False keeps bf16/fp16 LoRA weights
    as stored; PEFT then rounds the delta to the model dtype before adding it (two roundings).
    """
    quiet()
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    base_files = load_tensors(base_dir)
    stored = set(base_files)

    base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    base_logits = _logits(base_model)

    pm = peft_model(
        base_dir, [path for path, _ in adapters], dtype=dtype, autocast_adapter_dtype=autocast_adapter_dtype
    )
    names = list(pm.peft_config)
    configs = [json.loads((resolve_adapter_dir(path) / "adapter_config.json").read_text()) for path, _ in adapters]

    exact: dict[str, torch.Tensor] = {}
    start: dict[str, torch.Tensor] = {}
    mag: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    for mpath, module in pm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base_layer = module.get_base_layer()
        wkey = _stored_name(mpath, base_layer.weight, pm, stored, "weight")
        for name, (_path, w) in zip(names, adapters):
            if name not in module.scaling:
                continue
            module.scaling[name] *= w  # the plan weight: scales B@A and a trained lora_B.bias alike
            if wkey not in exact:
                # the weight PEFT actually starts from (an adapter may have replaced the base layer)
                start[wkey] = base_layer.weight.detach().double().clone()
                exact[wkey] = start[wkey].clone()
                mag[wkey] = start[wkey].abs()
                steps[wkey] = 0
            delta, delta_mag = _lora_delta64(module, name)
            steps[wkey] += 1
            if name in getattr(module, "lora_magnitude_vector", {}):
                if len([n for n in names if n in module.scaling]) != 1:
                    raise NotImplementedError("float64 DoRA reference for several adapters on one layer")
                before = exact[wkey]
                exact[wkey] = _dora64(module, name, before, delta)
                factor = (exact[wkey].abs() / (before + delta).abs().clamp_min(1e-30)).clamp(max=10.0)
                mag[wkey] = torch.maximum(factor, torch.ones_like(factor)) * (mag[wkey] + delta_mag)
            else:
                exact[wkey] = exact[wkey] + delta
                mag[wkey] = mag[wkey] + delta_mag
            if module.lora_bias.get(name, False):
                bkey = _stored_name(mpath, base_layer.bias, pm, stored, "bias")
                if bkey not in exact:
                    start[bkey] = base_layer.bias.detach().double().clone()
                    exact[bkey] = start[bkey].clone()
                    mag[bkey] = start[bkey].abs()
                    steps[bkey] = 0
                bias_delta = module.lora_B[name].bias.detach().double() * float(module.scaling[name])
                exact[bkey] = exact[bkey] + bias_delta
                mag[bkey] = mag[bkey] + bias_delta.abs()
                steps[bkey] += 1

    assert any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in pm.modules())
    merged = pm.merge_and_unload()
    merged.eval()
    logits = _logits(merged)

    out = Path(work_dir) / "peft-merged"
    merged.save_pretrained(str(out), max_shard_size="20KB")
    files = load_tensors(out)

    replaced = {
        k
        for k, t in files.items()
        if k not in exact and k in base_files and tensor_bytes(t) != tensor_bytes(base_files[k])
    }
    delta = {k: (exact[k] - start[k]).abs() for k in exact}
    return PeftReference(
        model=merged,
        files=files,
        base=base_files,
        exact=exact,
        delta=delta,
        mag=mag,
        steps=steps,
        replaced=replaced,
        logits=logits,
        base_logits=base_logits,
        adapter_configs=configs,
    )


def rounding_tolerance(dtype: torch.dtype, value: torch.Tensor, mag: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-element bound on |shardmerge - PEFT| from rounding alone.

    shardmerge rounds the float32 sum once (<= ulp(W')/2). PEFT adds one delta at a time (one per
    adapter, and per tied alias) and rounds after each, and may round each delta to `dtype` first; every
    intermediate value is bounded by `mag` = |W| + sum_i |s_i| |B_i| @ |A_i|, which also bounds the
    float32 summation noise of the matmuls (cancellation inside B @ A). With eps = ulp(1) of the dtype,
    ulp(x) <= eps*|x|, so the two differ by at most eps*(|W'| + steps*mag) (+ float32 noise, which
    matters only for float32 outputs, hence the larger factor there) plus the subnormal spacing.
    """
    fi = torch.finfo(dtype)
    k = steps + (16.0 if dtype == torch.float32 else 0.0)
    return fi.eps * (1.5 * value.abs() + k * mag) + 2 * fi.eps * fi.smallest_normal


def float64_slack(dtype: torch.dtype, exact: torch.Tensor, mag: torch.Tensor) -> float:
    """Slack allowed on top of PEFT's max error vs float64: float32 arithmetic noise, a few ulps of
    float32 at the tensor's scale. Negligible next to a bf16/fp16 ulp."""
    scale = float(exact.abs().max()) + float(mag.max()) if exact.numel() else 0.0
    return 8 * torch.finfo(torch.float32).eps * scale


def peft_model(base, adapter_dirs, auto_class=None, dtype=torch.float32, autocast_adapter_dtype=True, **load_kwargs):
    """Every adapter loaded into one PeftModel (named adapter0, adapter1, ...) on the base, all of them active, in
    eval mode: what a PEFT user merges. `base` is a model in memory, or a directory loaded with `auto_class`
    (default AutoModelForCausalLM) in `dtype`.

    autocast_adapter_dtype is passed to PEFT's loaders (True, PEFT's default, holds LoRA weights in float32).
    """
    quiet()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = base
    if not isinstance(base, torch.nn.Module):
        model = (auto_class or AutoModelForCausalLM).from_pretrained(str(base), dtype=dtype, **load_kwargs)
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    first, *others = [str(resolve_adapter_dir(path)) for path in adapter_dirs]
    pm = PeftModel.from_pretrained(model, first, adapter_name=names[0], autocast_adapter_dtype=autocast_adapter_dtype)
    for name, path in zip(names[1:], others):
        pm.load_adapter(path, adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype)
    pm.base_model.set_adapter(names)
    return pm.eval()


def peft_merged(base, adapter_dirs, auto_class=None, dtype=torch.float32, **load_kwargs):
    """PEFT's merge_and_unload() of the adapters (all active, weight 1) into the base, in eval mode."""
    return peft_model(base, adapter_dirs, auto_class, dtype, **load_kwargs).merge_and_unload().eval()


def assert_same_model(
    out_dir, reference, auto_class=None, dtype=torch.float32, rtol=1e-5, atol=1e-6, inputs=None, **load_kwargs
):
    """Load `out_dir` with the Auto class and compare every parameter (tied aliases included) and the logits on
    `inputs` (forward keyword arguments; default the input_ids() batch)."""
    quiet()
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    model = auto_class.from_pretrained(str(out_dir), dtype=dtype, **load_kwargs).eval()
    want = dict(reference.named_parameters(remove_duplicate=False))
    got = dict(model.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, param in want.items():
        torch.testing.assert_close(got[name], param, rtol=rtol, atol=atol, msg=name)
    inputs = inputs or {"input_ids": input_ids()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=10 * rtol, atol=10 * atol)
    return model
