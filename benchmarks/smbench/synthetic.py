"""Synthetic Llama-shaped bf16 models with a LoRA adapter and a shardmerge plan, from a fixed seed.

Shards are written tensor by tensor (write_shard_streaming), so generating a model larger than RAM never
holds more than one tensor. `bench-model.json` is written last and marks a model complete; a later run
with the same parameters reuses it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
import zlib
from pathlib import Path

from .common import (
    DEFAULT_ROOT,
    GB,
    MB,
    PROJECT,
    dir_bytes,
    global_sync,
    human,
    log,
    rmtree,
)

META_NAME = "bench-model.json"


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-like shapes, largest first. `auto` takes the first that gives >= 8 layers for the requested
# size, so 2 GB -> hidden 2048 x 16 layers (the reference "1.7 GiB / 1.9 GB" model).
SHAPES = {
    "h4096": dict(hidden=4096, intermediate=11008, vocab=32000),
    "h2048": dict(hidden=2048, intermediate=5632, vocab=32000),
    "h1024": dict(hidden=1024, intermediate=2816, vocab=32000),
    "h512": dict(hidden=512, intermediate=1376, vocab=8000),
    "h256": dict(hidden=256, intermediate=688, vocab=4000),
}


MIN_AUTO_LAYERS = 8


BF16 = 2


def layer_params(h: int, i: int) -> int:
    return 4 * h * h + 3 * h * i + 2 * h


def model_bytes(shape: dict, layers: int) -> int:
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    return BF16 * (2 * v * h + h + layers * layer_params(h, i))


def choose_shape(size_gb: float, shape_name: str = "auto", layers: int | None = None) -> tuple[str, dict, int]:
    target = size_gb * GB
    names = list(SHAPES) if shape_name == "auto" else [shape_name]
    for name in names:
        shape = SHAPES[name]
        fixed = model_bytes(shape, 0)
        per = BF16 * layer_params(shape["hidden"], shape["intermediate"])
        n = layers if layers else max(1, int((target - fixed) // per))
        if shape_name != "auto" or layers or n >= MIN_AUTO_LAYERS or name == names[-1]:
            return name, shape, n
    raise AssertionError("unreachable")


def tensor_specs(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in the order transformers writes a LlamaForCausalLM."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (h, h), "normal"),
            (p + "self_attn.v_proj.weight", (h, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "mlp.gate_proj.weight", (i, h), "normal"),
            (p + "mlp.up_proj.weight", (i, h), "normal"),
            (p + "mlp.down_proj.weight", (h, i), "normal"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "normal")]
    return specs


def seeded(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def make_tensor(name: str, shp: tuple[int, ...], init: str, seed: int, dtype, std: float = 0.02):
    import torch

    t = torch.empty(shp, dtype=dtype)
    t.normal_(0.0, std, generator=seeded(seed, name))
    if init == "norm":
        t.add_(1.0)
    return t


def write_config(base: Path, shape: dict, layers: int) -> None:
    h = shape["hidden"]
    heads = max(1, h // 128)
    fields = dict(
        hidden_size=h, intermediate_size=shape["intermediate"], num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=shape["vocab"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )  # fmt: skip
    try:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**fields)
        cfg.architectures = ["LlamaForCausalLM"]
        try:
            cfg.dtype = "bfloat16"
        except Exception:  # noqa: BLE001 - older transformers
            cfg.torch_dtype = "bfloat16"
        cfg.save_pretrained(base)
    except ImportError:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **fields}
        (base / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")


def write_adapter(
    adir: Path,
    base: Path,
    shape: dict,
    layers: int,
    seed: int,
    rank: int,
    alpha: int,
    dtype_name: str,
    projections: tuple[str, ...] = PROJECTIONS,
):
    import torch
    from safetensors.torch import save_file

    adir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    h, i = shape["hidden"], shape["intermediate"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)  # fmt: skip
    tensors = {}
    for n in range(layers):
        for proj in projections:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{n}.{sub}.{proj}"
            fan_in, fan_out = dims[proj]
            tensors[key + ".lora_A.weight"] = make_tensor(key + ".A", (rank, fan_in), "normal", seed, dtype, 0.02)
            tensors[key + ".lora_B.weight"] = make_tensor(key + ".B", (fan_out, rank), "normal", seed, dtype, 0.02)
    save_file(tensors, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = None
    try:
        from peft import LoraConfig

        lc = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(projections), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base))  # fmt: skip
        lc.save_pretrained(str(adir))
        cfg = json.loads((adir / "adapter_config.json").read_text())
    except ImportError:
        pass
    if cfg is None:
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
               "target_modules": list(projections), "lora_dropout": 0.0, "bias": "none",
               "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
               "base_model_name_or_path": str(base), "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "inference_mode": True}  # fmt: skip
        (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == alpha
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_plan(path: Path, max_memory: str = "2GiB", device: str = "cpu", output: str = "./merged") -> None:
    path.write_text(
        "# shardmerge plan written by benchmarks/bench.py generate\n"
        "base: ./base\n"
        "adapters:\n"
        "  - path: ./adapter\n"
        "    weight: 1.0\n"
        f"output: {output}\n"
        f"max_memory: {max_memory}\n"
        f"device: {device}\n"
    )


def write_shard_streaming(path: Path, specs: list, seed: int) -> None:
    """One safetensors shard written tensor by tensor: the header (shardmerge's own encoder, the layout the
    reference writer gives: back to back, header padded to 8) first, then each tensor made and written
    alone, so a 5 GB shard or a model larger than RAM never sits in memory."""
    import torch

    sys.path.insert(0, str(PROJECT))
    from shardmerge.safetensors_io import encode_header

    entries = [(name, "BF16", shape, BF16 * math.prod(shape)) for name, shape, _ in specs]
    header, _ = encode_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        for name, shape, init in specs:
            f.write(make_tensor(name, shape, init, seed, torch.bfloat16).view(torch.uint8).numpy().tobytes())


def generate_model(out: Path, size_gb: float, seed: int = 0, shape_name: str = "auto", layers: int | None = None,
                   shard_bytes: int | None = None, rank: int = 16, alpha: int = 32, adapter_dtype: str = "float32",
                   force: bool = False, projections: tuple[str, ...] = PROJECTIONS) -> dict:  # fmt: skip
    """Generate (or reuse, when the same parameters were already generated) a model dir; return its meta."""
    name, shape, n_layers = choose_shape(size_gb, shape_name, layers)
    specs = tensor_specs(shape, n_layers)
    total = sum(BF16 * math.prod(s) for _, s, _ in specs)
    if shard_bytes is None:  # about 4 shards, clamped to 10 MB .. 1 GB
        shard_bytes = int(min(GB, max(10 * MB, total / 4)))
    wanted = dict(shape=name, **shape, layers=n_layers, seed=seed, shard_bytes=shard_bytes, rank=rank,
                  lora_alpha=alpha, adapter_dtype=adapter_dtype, projections=list(projections), version=2)  # fmt: skip
    meta_path = out / META_NAME
    if meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            log(f"reusing {out} ({human(meta['total_bytes'])}, {meta['layers']} layers, {meta['shards']} shards)")
            return meta
    if out.exists():
        if any(out.iterdir()) and not meta_path.exists() and not force:
            raise SystemExit(
                f"bench: {out} exists, is not empty and was not made by bench.py; pass --force or pick another --out"
            )
        rmtree(out)
    log(f"generating {out}: shape {name} x {n_layers} layers, {human(total)} bf16, seed {seed}")
    t0 = time.perf_counter()
    base = out / "base"
    base.mkdir(parents=True)
    # Group tensors into shards (a new shard starts when the next tensor would overflow).
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = BF16 * math.prod(spec[1])
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    n_shards = len(groups)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if n_shards == 1 else f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        write_shard_streaming(base / fname, group, seed)
        for nm, _, _ in group:
            weight_map[nm] = fname
        log(f"  wrote {fname} ({len(group)} tensors)")
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(base, shape, n_layers)
    adapter_bytes = write_adapter(out / "adapter", base, shape, n_layers, seed, rank, alpha, adapter_dtype, projections)
    write_plan(out / "plan.yaml")
    meta = dict(wanted, total_bytes=total, shards=n_shards, adapter_bytes=adapter_bytes,
                base_dir_bytes=dir_bytes(base), generated_s=round(time.perf_counter() - t0, 1),
                created=_dt.datetime.now().isoformat(timespec="seconds"))  # fmt: skip
    global_sync()
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the model complete
    log(f"generated {out} in {meta['generated_s']} s: {n_shards} shards, adapter {human(adapter_bytes)}")
    return meta


def load_meta(model: Path) -> dict:
    p = model / META_NAME
    if not p.exists():
        raise SystemExit(
            f"bench: {model} is not a generated benchmark model (no {META_NAME}); run `bench.py generate` or pass --size-gb"
        )
    return json.loads(p.read_text())


def model_dir_for(size_gb: float, root: Path = DEFAULT_ROOT, prefix: str = "model") -> Path:
    return root / f"{prefix}-{size_gb:g}g"


def ensure_model(
    model: Path | None, size_gb: float | None, seed: int, shape: str = "auto", root: Path = DEFAULT_ROOT
) -> tuple[Path, dict]:
    if model is None:
        if size_gb is None:
            raise SystemExit("bench: pass --model DIR or --size-gb N")
        model = model_dir_for(size_gb, root)
    if size_gb is not None and not (model / META_NAME).exists():
        generate_model(model, size_gb, seed=seed, shape_name=shape)
    return model, load_meta(model)
