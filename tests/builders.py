"""Builders for the PEFT-parity tests: tiny random models, random PEFT adapters, and references.

Everything here is deterministic (fixed seeds) and tiny (hidden 32, 2 layers, vocab 128), so a whole
case builds in well under a second on one CPU core. Nothing is downloaded: models come from configs.

Three references are produced for a (base, adapters, plan weights) case by `peft_reference`:

* PEFT's own merge: the base loaded with transformers, every adapter loaded into one PeftModel, all of
  them activated together, plan weights applied by multiplying each adapter's `scaling` (which scales
  both `B @ A` and a trained `lora_B.bias`), then `merge_and_unload()` and `save_pretrained()`. The
  saved files are what a user of PEFT + transformers would get.
* A float64 merge computed from the same loaded tensors, `W + sum_i w_i * s_i * delta_i` with PEFT's
  orientation per layer kind (and DoRA's renormalisation), for every tensor a LoRA delta touches.
* The set of tensors an adapter replaces outright (modules_to_save, trained biases, an embedding base
  layer saved inside the adapter): PEFT copies those, so the merge must too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POS = 64

# every linear projection of a Llama-style decoder layer
LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _quiet():
    """Silence the chatty but harmless warnings transformers and PEFT print for tiny random models."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001  # pragma: no cover - logging knobs are best effort
        pass


# --------------------------------------------------------------------------------------------------
# base models
# --------------------------------------------------------------------------------------------------


def tiny_config(arch: str, *, tie: bool = False):
    """A tiny config for one architecture.

    arch: "llama" (no biases), "llama_bias" (Llama with attention_bias=True: q/k/v/o biases),
    "qwen2" (q/k/v biases, no o bias), "phi3" (fused qkv_proj and gate_up_proj), "gpt2" (Conv1D layers,
    fan_in_fan_out weights stored (in, out)). `tie` sets tie_word_embeddings (GPT-2 is always tied).
    """
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama_bias":
        return LlamaConfig(attention_bias=True, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POS,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown arch {arch!r}")


def _randomize_base(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values, independent of transformers' init code.

    Matrices ~ N(0, 0.05^2); biases ~ N(0, 0.05^2) (so "the base bias is untouched" is a real check);
    norm weights ~ 1 + N(0, 0.1^2). Tied parameters are visited once.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 or name.endswith("bias"):
                p.copy_(noise * 0.05)
            else:
                p.copy_(1.0 + 0.1 * noise)


def build_base(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    dtype: torch.dtype = torch.bfloat16,
    *,
    tie: bool = False,
    seed: int = 0,
    max_shard_size: str = "20KB",
) -> Path:
    """Build a tiny random model, save it sharded (several files + index) in `dtype`, return its dir."""
    _quiet()
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie=tie), dtype=torch.float32)
    _randomize_base(model, seed)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    index = out / INDEX_NAME
    if not index.is_file():
        raise AssertionError(f"{out} was not sharded (no {INDEX_NAME}); lower max_shard_size")
    shards = set(json.loads(index.read_text())["weight_map"].values())
    if len(shards) < 2:
        raise AssertionError(f"{out} has only {len(shards)} shard; lower max_shard_size")
    return out


# --------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------


def shard_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single model.safetensors)."""
    d = Path(model_dir)
    if (d / INDEX_NAME).is_file():
        return dict(json.loads((d / INDEX_NAME).read_text())["weight_map"])
    with safe_open(str(d / SINGLE_NAME), "pt") as f:
        return {k: SINGLE_NAME for k in f.keys()}


def load_tensors(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint, by name, in its stored dtype."""
    d = Path(model_dir)
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(shard_files(d).values())):
        with safe_open(str(d / fname), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (for bit-identity checks; NaN-safe, -0.0-safe)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding adapter_config.json: `path` itself, or its single subdirectory that has one
    (PEFT's save_pretrained writes a non-default adapter name to `path/<name>/`)."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    subs = [s for s in sorted(p.iterdir()) if (s / "adapter_config.json").is_file()]
    if len(subs) != 1:
        raise FileNotFoundError(f"no unique adapter_config.json under {p}")
    return subs[0]


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------


def make_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    lora_config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 1,
    adapter_name: str = "default",
    adapter_in_model_dtype: bool = False,
    std: float = 0.1,
    mutate_state_dict=None,
) -> Path:
    """Create a PEFT adapter on the base, make every trainable tensor non-trivial, save it.

    All lora_A/lora_B/lora_embedding_A/B (and lora_B.bias) are drawn from N(0, std^2); DoRA magnitude
    vectors are multiplied by 1 + 0.25 * N(0,1) clamped to [0.5, 1.5]; every other trainable tensor
    (modules_to_save copies, trained biases) gets N(0, 0.05^2) added.

    adapter_in_model_dtype=False is PEFT's default (LoRA weights upcast to and saved in float32);
    True keeps (and saves) them in the model dtype, as an adapter trained in bf16/fp16 would be.
    mutate_state_dict(dict) may edit the saved tensors in place (rewritten after saving).
    Returns the path to give shardmerge: `adapter_dir` (for a non-default name PEFT writes the adapter
    into `adapter_dir/<adapter_name>/`; resolve_adapter_dir finds it).
    """
    _quiet()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    peft_model = get_peft_model(
        model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=not adapter_in_model_dtype
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                p.mul_((1.0 + 0.25 * noise).clamp(0.5, 1.5).to(p.dtype))
            elif "lora_" in name:
                p.copy_(noise * std)
            else:
                p.add_((noise * 0.05).to(p.dtype))
    out = Path(adapter_dir)
    peft_model.save_pretrained(str(out))
    if mutate_state_dict is not None:
        from safetensors.torch import load_file, save_file

        f = resolve_adapter_dir(out) / "adapter_model.safetensors"
        sd = load_file(str(f))
        mutate_state_dict(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


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
    _quiet()
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    base_files = load_tensors(base_dir)
    stored = set(base_files)

    base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    base_logits = _logits(base_model)

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    names = [f"adapter{i}" for i in range(len(adapters))]
    configs = []
    pm = None
    for name, (path, _w) in zip(names, adapters):
        adir = resolve_adapter_dir(path)
        configs.append(json.loads((adir / "adapter_config.json").read_text()))
        if pm is None:
            pm = PeftModel.from_pretrained(
                model, str(adir), adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype
            )
        else:
            pm.load_adapter(str(adir), adapter_name=name, autocast_adapter_dtype=autocast_adapter_dtype)
    assert pm is not None, "at least one adapter"
    pm.base_model.set_adapter(names)
    pm.eval()

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


# --------------------------------------------------------------------------------------------------
# tolerances
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# model-level comparison (for outputs whose on-disk names or layout differ from PEFT's save)
# --------------------------------------------------------------------------------------------------


def peft_merged(base_dir, adapter_dirs, auto_class=None, dtype=torch.float32, **load_kwargs):
    """PEFT's merge_and_unload() of the adapters (all active, weight 1) into the base, in eval mode."""
    _quiet()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    model = auto_class.from_pretrained(str(base_dir), dtype=dtype, **load_kwargs)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    pm = PeftModel.from_pretrained(model, str(resolve_adapter_dir(adapter_dirs[0])), adapter_name=names[0])
    for name, path in zip(names[1:], adapter_dirs[1:]):
        pm.load_adapter(str(resolve_adapter_dir(path)), adapter_name=name)
    pm.base_model.set_adapter(names)
    return pm.merge_and_unload().eval()


def assert_same_model(out_dir, reference, auto_class=None, dtype=torch.float32, rtol=1e-5, atol=1e-6, **load_kwargs):
    """Load `out_dir` with the Auto class and compare every parameter (tied aliases included) and the logits."""
    _quiet()
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    model = auto_class.from_pretrained(str(out_dir), dtype=dtype, **load_kwargs).eval()
    want = dict(reference.named_parameters(remove_duplicate=False))
    got = dict(model.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name, param in want.items():
        torch.testing.assert_close(got[name], param, rtol=rtol, atol=atol, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids()).logits, reference(input_ids()).logits, rtol=10 * rtol, atol=10 * atol
        )
    return model


def run_cli(*args) -> tuple[int, str]:
    """`python -m shardmerge ARGS`, in this process (no interpreter start-up); returns (exit code, stderr)."""
    import contextlib
    import io

    from shardmerge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()
