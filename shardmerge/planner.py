"""From a Plan and the inputs' headers to a MergePlan: which base tensor each adapter tensor changes,
how, in what tiles, and where every output byte goes. No tensor data is read here (but see ties.py).

build_plan is the recipe; each step's rules live in the module named for them: matching (adapter tensors to
Terms on base tensors), ties (tied embeddings), layout (output shards, offsets, headers), budget (tiles and
buffers within max_memory), mergeplan (the plan's dataclasses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from . import modelsource
from .adapters import Adapter, load_adapter
from .budget import tile
from .config import Plan
from .errors import ShardmergeError
from .formats import Codec, Quantized, detect
from .layout import lay_out, shard_inputs
from .matching import collect
from .mergeplan import MergePlan
from .names import BaseNames
from .safetensors_io import read_header
from .sources import INDEX_NAME, BaseModel, architecture, convert_legacy_adapter, find_adapter, read_base
from .stores import store_for
from .ties import Edits, find_ties, settle
from .units import format_size

# What quantized formats store codes and scales in; never a float value on its own.
_CODE_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "U8", "I8"}
FORMAT_VERSION = 3  # bump when the same plan would produce different bytes (2: headers padded to the base's
# length; 3: bfloat16/float16 outputs keep transformers' float32 parameters)


def build_plan(plan: Plan, scratch: Path, device: str = "cpu", budget: int | None = None) -> MergePlan:
    """Read headers and configs, match every adapter tensor, lay out and tile the output. `budget` is the
    bytes tiles may fill (cuda.tile_budget: on CUDA also bounded by GPU memory); default max_memory."""
    base = read_base(plan.base)
    codec = detect(base.config, base.directory)
    quantized = codec.weights(base.tensors) if codec else {}
    view = _logical_view(base, quantized)
    adapters = _read_adapters(plan, scratch)
    names = BaseNames(view)
    ties = find_ties(view, names)
    logical = {q.name for q in quantized.values()}
    edits = collect(view, adapters, names, ties, logical)
    settle(ties, edits, view)
    if plan.dtype == "keep":
        _refuse_quantized_replacement(edits, logical, codec)
    else:
        _refuse_undecoded_codes(base, quantized, codec)
    shards = lay_out(base, quantized, edits, plan.dtype, plan.max_shard_size, _kept_in_float32(base, plan.dtype))
    write_index = base.has_index or len(shards) > 1
    config = _output_config(base, edits, codec, plan.dtype)
    merge_plan = MergePlan(
        plan, base, adapters, shards, write_index, device, config=config, inputs=shard_inputs(shards, adapters)
    )
    if codec is not None:
        merge_plan.quant_label = codec.label
        if plan.dtype != "keep":
            merge_plan.dropped_files = set(codec.extra_files)
    merge_plan.buffers = tile(merge_plan, plan.max_memory if budget is None else budget)
    merge_plan.fingerprint = fingerprint(merge_plan)
    return merge_plan


def _read_adapters(plan: Plan, scratch: Path) -> list[Adapter]:
    adapters = []
    for spec in plan.adapters:
        files = find_adapter(spec.path)
        original = files.weights
        if files.header is None:
            files = convert_legacy_adapter(files, scratch)
        adapter = load_adapter(files, spec.path, spec.weight)
        adapter.peft_version = spec.peft_version or files.config.get("peft_version")
        adapter.original = original
        adapters.append(adapter)
    return adapters


def _logical_view(base: BaseModel, quantized: dict[str, Quantized]) -> BaseModel:
    """The base as adapters see it: each quantized weight one logical tensor, its scales hidden."""
    if not quantized:
        return base
    hidden = {t.name for q in quantized.values() for t in q.scales + q.passengers}
    tensors = {}
    for name, tensor in base.tensors.items():
        if name in quantized:
            tensors[quantized[name].name] = quantized[name].logical
        elif name not in hidden:
            tensors[name] = tensor
    return dataclasses.replace(base, tensors=tensors)


def _refuse_quantized_replacement(edits: Edits, logical: set[str], codec: Codec | None) -> None:
    """A kept quantized format has no float tensor to put a replacement (modules_to_save) in."""
    clash = sorted(set(edits.replaced) & logical)
    if clash:
        replacement = edits.replaced[clash[0]]
        raise ShardmergeError(
            f"{replacement.path}: {replacement.name!r} replaces {clash[0]!r}, a {codec.label} "
            "weight; replacing a quantized weight needs a float output (dtype: bfloat16)"
        )


def _kept_in_float32(base: BaseModel, dtype: str) -> set[str]:
    """Stored tensors a bfloat16/float16 output keeps in float32, as transformers loads and saves them in that
    dtype (DeepSeek-V3's router e_score_correction_bias, ERNIE's router gate.weight, T5's wo in float16)."""
    config = base.config
    if dtype not in ("bfloat16", "float16") or config.get("auto_map"):  # remote code: not transformers' class
        return set()
    patterns = modelsource.kept_in_float32(str(config.get("model_type")), architecture(config), dtype)
    if not patterns:
        return set()
    found = re.compile("|".join(p.replace("*", ".*") for p in patterns))  # transformers' build_glob_alternation
    return {name for name in base.tensors if found.search(name)}


def _refuse_undecoded_codes(base: BaseModel, quantized: dict[str, Quantized], codec: Codec | None) -> None:
    """A dequantized output is a plain float checkpoint: codes the format's codec does not decode (transformers'
    fused FP8Experts `gate_up_proj` + `gate_up_proj_scale_inv`, say) would be written as raw codes, silently
    wrong. Kept outputs copy them with their scales, as stored."""
    if codec is None:
        return
    decoded = set(quantized) | {t.name for q in quantized.values() for t in q.scales + q.passengers}
    for name, t in base.tensors.items():
        if t.dtype in _CODE_DTYPES and name not in decoded:
            raise ShardmergeError(
                f"{t.path}: {name!r} {list(t.shape)} {t.dtype} is not a weight {codec.label} dequantizes here, "
                "so a float output would hold its raw codes; merge with dtype: keep (it is then copied as stored)"
            )


def _output_config(base: BaseModel, edits: Edits, codec: Codec | None, dtype: str) -> dict | None:
    """config.json to write instead of the base's, if it changes: untied embeddings (edits.config), the dtype
    the tensors were cast to, and a dequantized base is a plain float checkpoint now, so nothing may say
    otherwise."""
    config = edits.config
    if codec is not None and dtype != "keep":
        config = {k: v for k, v in (config or base.config).items() if k != "quantization_config"}
    if dtype != "keep":
        config = _with_dtype(base.config if config is None else config, dtype)
    return config


def _with_dtype(config: dict, dtype: str) -> dict:
    """config.json for tensors cast to `dtype`: save_pretrained writes the dtype the weights are stored in, and
    from_pretrained(dtype="auto") and vLLM load in it; sub-configs (a VLM's text_config) that say one say it too."""
    config = dict(config, dtype=dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    for key, sub in config.items():
        if isinstance(sub, dict) and {"dtype", "torch_dtype"} & set(sub):
            config[key] = {k: dtype if k in ("dtype", "torch_dtype") else v for k, v in sub.items()}
    return config


def fingerprint(merge_plan: MergePlan) -> str:
    """What the output bytes depend on, short of the inputs' data: base and adapter headers, adapter configs
    and plan weights, the base config, options and layout."""
    h = hashlib.sha256()
    plan = merge_plan.plan
    record = {
        "format": FORMAT_VERSION,
        "dtype": plan.dtype,
        "max_shard_size": plan.max_shard_size,
        "device": merge_plan.device.split(":")[0],
        "base": [
            (s.path.name, s.file_size, hashlib.sha256(_header_bytes(s)).hexdigest()) for s in merge_plan.base.shards
        ],
        # Headers only, like the base: which version of each input's data the output holds is checked per
        # shard by the inputs' identities (MergePlan.inputs), so a resume redoes exactly what a change touches.
        "adapters": [
            (
                a.weight,
                a.peft_version,
                json.dumps(a.config, sort_keys=True),
                hashlib.sha256(_header_bytes(read_header(a.weights))).hexdigest(),
            )
            for a in merge_plan.adapters
        ],
        "config": merge_plan.base.config,  # decides orientation and tying
        "output_config": merge_plan.config,
        "layout": [
            (s.name, [(t.name, t.source.name) for t in s.tasks if t.name != t.source.name]) for s in merge_plan.shards
        ],
    }
    h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def _header_bytes(shard) -> bytes:
    buffer = bytearray(shard.data_start)
    with store_for(shard.path).open(shard.path) as reader:
        reader.read_into(buffer, 0)
    return bytes(buffer)


def describe(merge_plan: MergePlan) -> str:
    """The --dry-run report: every target with its rank and scaling, and the bytes to read and write."""
    lines = [
        f"base: {merge_plan.base.directory} ({len(merge_plan.base.shards)} shards, "
        f"{len(merge_plan.base.tensors)} tensors)"
    ]
    for i, a in enumerate(merge_plan.adapters):
        lines.append(
            f"adapter {i}: {a.path} (weight {a.weight:g}, {len(a.modules)} LoRA modules, "
            f"{len(a.param_loras)} expert parameters, {len(a.replacements)} replaced tensors)"
        )
    if merge_plan.quant_label:
        mode = "kept" if merge_plan.plan.dtype == "keep" else f"dequantized to {merge_plan.plan.dtype}"
        lines.append(f"quantized: {merge_plan.quant_label}, {mode}")
    counts = {"merged": 0, "replaced": 0, "copied byte for byte": 0, "converted": 0}
    read = 0
    seen: set[str] = set()  # an expert parameter's line is the same for each base tensor it covers: print it once
    base_shards = {s.path for s in merge_plan.base.shards}
    for shard in merge_plan.shards:
        for t in shard.tasks:
            read += t.source.nbytes + sum(x.nbytes for term in t.terms for x in term.reads())
            if t.source.path not in base_shards:
                counts["replaced"] += 1
            elif t.terms:
                counts["merged"] += 1
            else:
                counts["copied byte for byte" if t.is_copy else "converted"] += 1
            for line in (term.describe(t) for term in t.terms):
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
    written = sum(s.size for s in merge_plan.shards)
    lines.append(
        f"output: {merge_plan.plan.output}: {len(merge_plan.shards)} shards "
        f"({', '.join(s.name for s in merge_plan.shards[:3])}{', ...' if len(merge_plan.shards) > 3 else ''})"
        f"{' + ' + INDEX_NAME if merge_plan.write_index else ''}"
    )
    lines.append("tensors: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    lines.append(
        f"bytes: {format_size(read)} to read, {format_size(written)} to write; "
        f"max_memory {format_size(merge_plan.plan.max_memory)}"
        f", device {merge_plan.device}"
    )
    return "\n".join(lines)
