"""LoRA on expert parameters (PEFT `target_parameters`, its `ParamWrapper`) and where an expert
parameter's delta lands in the base checkpoint.

PEFT reads a 3-D parameter P (E, d1, d2) as E experts and packs all of them into one pair of factors:
lora_A (r*E, a) with expert e in rows e*r .. e*r+r-1, and lora_B (b, r*E) with expert e in columns
k*E + e (the expert index varies fastest; Unsloth's `grouped_by_expert` puts it in columns e*r + k).
PEFT's delta is either ΔP[e] = B_e @ A_e ("swapped": a = d2, b = d1) or ΔP[e] = A_eᵀ @ B_eᵀ (a = d1,
b = d2); which one depends on the PEFT version that trained the adapter, and the shapes decide it unless
the experts are square (d1 == d2). Both are a product L_e @ R_e with L_e (d1, r) and R_e (r, d2), which is
the form the merge math takes.

transformers 5 holds experts fused in memory (`mlp.experts.gate_up_proj` (E, 2I, H) = [gate; up]), while
checkpoints often store them one by one (`mlp.experts.N.gate_proj.weight`) and convert at load. The
delta is in module layout, so each base tensor an expert parameter covers gets an `ExpertSlice`: which
experts, which rows of each ΔP[e] (gate = rows 0:I, up = rows I:2I) and whether it is stored transposed.
The mapping comes from transformers' conversion rules when transformers is importable, else from a
built-in table of the common families (a test checks that the two agree).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache, lru_cache

from .errors import ShardmergeError
from .safetensors_io import TensorInfo
from .sources import special_floats

RANK_MAJOR, GROUPED_BY_EXPERT = "rank_major", "grouped_by_expert"
# PEFT's swap rule for 3-D parameters by the version that saved the adapter (peft git history):
# <= 0.18.1 never swaps; 0.19.0 swaps when the experts module says is_transposed; from 0.19.1 on it swaps
# when it does not. A dev build between 0.19.0 and 0.19.1 may follow either, so it is no provenance.
_NEVER, _IF_TRANSPOSED, _UNLESS_TRANSPOSED = "never", "if is_transposed", "unless is_transposed"
# Experts modules whose parameters are (E, in, out) and say so (`is_transposed=True` in transformers).
_TRANSPOSED_EXPERTS = ("gpt_oss", "openai_privacy_filter", "aria")
# The order transformers' experts modules register their parameters in; PEFT nests one ParamWrapper per
# targeted parameter in this order, so the first one gains the most `.base_layer` segments.
_REGISTRATION_ORDER = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "down_proj", "down_proj_bias")


@dataclass(frozen=True)
class ParamLora:
    """One ParamWrapper's factors as saved: the module that owns the parameter and its nesting depth."""

    owner: str  # module path, PEFT prefix and `.base_layer` segments removed
    depth: int  # how many `.base_layer` segments the saved keys carry
    a: TensorInfo
    b: TensorInfo


@dataclass(frozen=True)
class ExpertRule:
    """How one expert parameter of a model family is stored: fused under its own name (possibly transposed or
    with gate/up interleaved), or one 2-D tensor per expert per `sources` leaf, stacked along d1. Names are
    module-side; checkpoint renames around them (Mixtral's `block_sparse_moe.`) are names.BaseNames's."""

    param: str
    sources: tuple[str, ...] = ()  # per-expert leaves, e.g. ("gate_proj", "up_proj"); () = fused
    transposed: bool = False  # fused, stored (E, d2, d1)
    interleaved: bool = False  # fused, d1 stored interleaved (gate0, up0, gate1, ...)
    fused_name: str = ""  # checkpoint leaf of a fused tensor when it differs from `param`


@dataclass(frozen=True)
class ExpertSlice:
    """The part of ΔP (E, d1, d2) one base tensor holds: experts [first, first+count) and rows start:stop of
    each ΔP[e], stored as (count*rows, d2), or transposed as (count*d2, rows); `interleaved`: the rows are
    stored gate0, up0, gate1, up1, ... (transformers' Interleave(dim=1))."""

    first: int
    count: int
    start: int
    stop: int
    transposed: bool = False
    interleaved: bool = False

    def row_order(self) -> list[int]:
        """Rows of ΔP[e] in the order the base tensor stores them."""
        rows = list(range(self.start, self.stop))
        if not self.interleaved:
            return rows
        half = len(rows) // 2
        return [rows[i // 2 + (i % 2) * half] for i in range(len(rows))]

    def describe(self, d1: int) -> str:
        kind = "fused" if self.count > 1 else f"expert {self.first}"
        part = "" if (self.start, self.stop) == (0, d1) else f" rows {self.start}:{self.stop}"
        return kind + part + (" interleaved" if self.interleaved else "") + (" transposed" if self.transposed else "")


# The built-in table: what transformers 5.23's conversion_mapping.py says for these families.
_PER_EXPERT = (ExpertRule("gate_up_proj", ("gate_proj", "up_proj")), ExpertRule("down_proj", ("down_proj",)))
_W1_W3_W2 = (ExpertRule("gate_up_proj", ("w1", "w3")), ExpertRule("down_proj", ("w2",)))
BUILTIN_RULES: dict[str, tuple[ExpertRule, ...]] = {
    "qwen2_moe": _PER_EXPERT,
    "mixtral": _W1_W3_W2,
    "lfm2_moe": _W1_W3_W2,
    "qwen3_vl_moe": (ExpertRule("gate_up_proj", transposed=True), ExpertRule("down_proj", transposed=True)),
}
# model_type -> family, for the families above (transformers' _MODEL_TO_CONVERSION_PATTERN holds the full list).
_BUILTIN_FAMILIES = {
    **{t: "qwen2_moe" for t in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe",
                                "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo", "qwen3_next", "exaone_moe")},
    "mixtral": "mixtral", "minimax": "mixtral", "lfm2_moe": "lfm2_moe",
    "qwen3_vl_moe": "qwen3_vl_moe",
}  # fmt: skip


# -- the adapter side -------------------------------------------------------------------------------------


def is_param_module(module: str, targets: list[str]) -> bool:
    """Whether a saved LoRA module is a ParamWrapper: its name (without `.base_layer`) owns a parameter
    `target_parameters` names (PEFT matches `<module>.<param>` by equality or a dotted suffix)."""
    owner = strip_base_layers(module)[0]
    for target in targets:
        module_part = target.rpartition(".")[0]
        if not module_part or owner == module_part or owner.endswith("." + module_part):
            return True
    return False


def strip_base_layers(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    return module, depth


def assign_params(owner: str, loras: list[ParamLora], params: list[str]) -> dict[str, ParamLora]:
    """Which targeted parameter each nesting depth belongs to: PEFT wraps them in registration order, so the
    first registered is innermost (deepest). `params` are the owner's targeted parameters in that order."""
    if len(params) != len(loras) or sorted(x.depth for x in loras) != list(range(len(loras))):
        depths = sorted(x.depth for x in loras)
        raise ShardmergeError(
            f"{loras[0].a.path}: {owner!r} has LoRA at nesting depths {depths} but targets "
            f"{len(params)} parameters ({', '.join(params) or 'none'}) there"
        )
    by_depth = {x.depth: x for x in loras}
    return {p: by_depth[len(params) - 1 - i] for i, p in enumerate(params)}


def targeted_params(owner: str, names: list[str], targets: list[str]) -> list[str]:
    """The owner's parameters (in registration order) that `target_parameters` names, as PEFT matches them."""
    return [p for p in names if any(f"{owner}.{p}" == t or f"{owner}.{p}".endswith("." + t) for t in targets)]


def lora_b_layout(config: dict, where) -> str:
    layout = config.get("lora_B_layout", RANK_MAJOR)
    if layout not in (RANK_MAJOR, GROUPED_BY_EXPERT):
        raise ShardmergeError(f"{where}: lora_B_layout={layout!r}; expected {RANK_MAJOR!r} or {GROUPED_BY_EXPERT!r}")
    return layout


# -- orientation --------------------------------------------------------------------------------------------


def swap_rule(peft_version) -> str | None:
    """PEFT's 3-D swap rule for the version that saved an adapter, or None when the version does not tell."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)((?:rc|\.dev)\d+)?(?:\+\S*|@\S*)?", str(peft_version or ""))
    if not match:
        return None
    version, pre = tuple(int(x) for x in match.groups()[:3]), match.group(4)
    if version < (0, 19, 0) or (version == (0, 19, 0) and pre):
        return _NEVER
    if version == (0, 19, 0):
        return _IF_TRANSPOSED
    if version == (0, 19, 1) and pre:
        return None
    return _UNLESS_TRANSPOSED


def swapped(a: tuple, b: tuple, d1: int, d2: int, rule: str | None, is_transposed, origin: str) -> bool:
    """Whether PEFT's delta for P (E, d1, d2) is B_e @ A_e (swapped) or A_eᵀ @ B_eᵀ. The factor shapes are what
    the adapter was trained with, so they decide; only square experts need the saving version's rule, and
    `is_transposed()` (asked only then) says how the experts module is laid out."""
    fits_swapped, fits_plain = (a[1], b[0]) == (d2, d1), (a[1], b[0]) == (d1, d2)
    if not (fits_swapped or fits_plain):
        raise ShardmergeError(
            f"{origin}: lora_A {list(a)} / lora_B {list(b)} fit no orientation of the expert parameter (E, {d1}, {d2})"
        )
    if fits_swapped != fits_plain:
        return fits_swapped
    if rule is None:
        raise ShardmergeError(
            f"{origin}: the expert layout is ambiguous: the experts are square ({d1}x{d2}) and the adapter "
            "does not say which PEFT version saved it; set peft_version in the plan's adapter entry (the PEFT "
            "version that trained it, e.g. peft_version: 0.21.2)"
        )
    return {_NEVER: False, _IF_TRANSPOSED: is_transposed(), _UNLESS_TRANSPOSED: not is_transposed()}[rule]


# -- the model side ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerFacts:
    """A module holding 3-D (expert) parameters, as the model class defines it."""

    params: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in registration order
    is_transposed: bool  # transformers' experts flag: parameters are (E, in, out)

    def shape(self, param: str) -> tuple[int, ...] | None:
        return next((s for n, s in self.params if n == param), None)


def module_facts(config: dict) -> dict[str, OwnerFacts] | None:
    """Every expert-holding module of the base's model class, by in-memory path, or None when transformers
    cannot build the class. The model is built on the meta device: no memory, no weights read."""
    return _module_facts(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=4)
def _module_facts(config_json: str) -> dict[str, OwnerFacts] | None:
    try:
        import torch
        import transformers

        config = json.loads(config_json)
        hf_config = transformers.AutoConfig.for_model(**special_floats(config))
        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            if model_class is not None:
                model = model_class._from_config(hf_config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # noqa: BLE001 - any class transformers cannot build here: the built-in table decides
        return None
    facts = {}
    for name, module in model.named_modules():
        params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        if any(len(shape) == 3 for _, shape in params):
            facts[name] = OwnerFacts(params, bool(getattr(module, "is_transposed", False)))
    return facts


class ModelFacts:
    """What the base's model class says about an experts module, asked only when the checkpoint and the factor
    shapes leave it open (building the class, even on the meta device, imports all its modeling code): the
    registration order when a parameter is not in the common table, `is_transposed` for square experts."""

    def __init__(self, config: dict):
        self.config = config
        self._facts: dict[str, OwnerFacts] | None = None
        self._asked = False

    def _owner(self, owner: str) -> OwnerFacts | None:
        if not self._asked:
            self._facts, self._asked = module_facts(self.config), True
        return (self._facts or {}).get(owner)

    def targeted(self, owner: str, targets: list[str], count: int) -> list[str]:
        """The owner's `count` targeted parameters in registration order."""
        params = targeted_params(owner, list(_REGISTRATION_ORDER), targets)
        facts = self._owner(owner) if len(params) != count else None
        return targeted_params(owner, [n for n, _ in facts.params], targets) if facts else params

    def is_transposed(self, owner: str) -> bool:
        facts = self._owner(owner)
        return facts.is_transposed if facts else str(self.config.get("model_type")) in _TRANSPOSED_EXPERTS


# -- the checkpoint side ------------------------------------------------------------------------------------


def rules_for(config: dict) -> tuple[ExpertRule, ...]:
    """The expert rules for a base's model type and its sub-models' (transformers converts each sub-model by its
    own type: a Qwen3.5-MoE VLM's experts follow its text config's), from transformers when importable, else
    built in. The top-level type's rule for a parameter comes first."""
    types = [config.get("model_type")] + [v.get("model_type") for v in config.values() if isinstance(v, dict)]
    rules: dict[str, ExpertRule] = {}
    for model_type in types:
        for rule in _rules_of(str(model_type)) if model_type else ():
            rules.setdefault(rule.param, rule)
    return tuple(rules.values())


def _rules_of(model_type: str) -> tuple[ExpertRule, ...]:
    try:
        return transformers_rules(model_type)
    except ImportError:
        family = _BUILTIN_FAMILIES.get(model_type)
        return BUILTIN_RULES.get(family, ()) if family else ()


@cache
def transformers_rules(model_type: str) -> tuple[ExpertRule, ...]:
    """Expert rules read off transformers' checkpoint conversion mapping (MergeModulelist/Concatenate for
    per-expert checkpoints, Transpose, Interleave)."""
    from transformers.conversion_mapping import (
        _MODEL_TO_CONVERSION_PATTERN,
        get_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import (
        Concatenate,
        Interleave,
        MergeModulelist,
        Transpose,
        WeightConverter,
    )

    # transformers fills every model type's own list (a base pattern's copy, or that plus more: Qwen3.5-MoE's text
    # model adds qwen2_moe's experts to qwen3_5_text's renames); the pattern is only a fallback for a type it lacks.
    mapping = (
        get_checkpoint_conversion_mapping(model_type)
        or get_checkpoint_conversion_mapping(_MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type))
        or []
    )
    rules = []
    for t in mapping:
        if not isinstance(t, WeightConverter) or len(t.target_patterns) != 1:
            continue
        param = t.target_patterns[0].rpartition(".")[2]
        ops = [type(op) for op in t.operations]
        if ops in ([MergeModulelist], [MergeModulelist, Concatenate]):
            leaves = tuple(re.sub(r".*\.\*\.", "", s).removesuffix(".weight") for s in t.source_patterns)
            rules.append(ExpertRule(param, leaves))
        elif ops == [Transpose] and (t.operations[0].dim0, t.operations[0].dim1) in ((1, 2), (2, 1)):
            rules.append(ExpertRule(param, transposed=True))
        elif ops == [Interleave] and t.operations[0].dim == 1 and len(t.source_patterns) == 1:
            rules.append(
                ExpertRule(
                    param, interleaved=True, fused_name=t.source_patterns[0].replace("\\", "").rpartition(".")[2]
                )
            )
    return tuple(rules)


def checkpoint_slices(
    module: str, param: str, shape: tuple | None, rules: tuple[ExpertRule, ...], find
) -> tuple[tuple, list[tuple[str, ExpertSlice]]]:
    """The module parameter `module.param`'s shape (E, d1, d2) and every base tensor holding part of it, with
    the part it holds; `find(name)` gives the base tensor (TensorInfo) a module-side name stands for, checkpoint
    renames included (names.BaseNames), or None. `shape` is the parameter's shape
    when the model class is known; else it follows from the stored tensors and the rule. No tensors: ((), [])."""
    rule = next((r for r in rules if r.param == param), ExpertRule(param))
    info = find(f"{module}.{rule.fused_name or param}")
    first = find(f"{module}.0.{rule.sources[0]}.weight") if rule.sources else None
    if info is not None and first is not None:  # transformers loads one of them; a merge into the other is lost
        raise ShardmergeError(
            f"{info.path}: the base stores {module}.{param} twice, fused as {info.name!r} and one by one as "
            f"{first.name!r}, ...; keep one layout"
        )
    if info is not None:
        return _fused(info, shape, rule)
    if first is None:
        return (), []
    out, rows = [], 0
    for e in range(shape[0] if shape else _count_experts(module, rule.sources[0], find)):
        rows = 0
        for source in rule.sources:
            info = find(f"{module}.{e}.{source}.weight")
            if info is None or len(info.shape) != 2:
                raise ShardmergeError(
                    f"the base stores the experts of {module}.{param} one by one but "
                    f"{module}.{e}.{source}.weight is missing or not 2-D"
                )
            out.append((info.name, ExpertSlice(e, 1, rows, rows + info.shape[0])))
            rows += info.shape[0]
    found = (len(out) // len(rule.sources), rows, find(out[0][0]).shape[1])
    if shape is not None and tuple(shape) != found:
        raise ShardmergeError(
            f"the base's experts of {module}.{param} make {list(found)}, but the model defines it as {list(shape)}"
        )
    return found, out


def _count_experts(module: str, leaf: str, find) -> int:
    count = 0
    while find(f"{module}.{count}.{leaf}.weight") is not None:
        count += 1
    return count


def _fused(info: TensorInfo, shape: tuple | None, rule: ExpertRule) -> tuple[tuple, list[tuple[str, ExpertSlice]]]:
    if len(info.shape) != 3:
        raise ShardmergeError(f"base tensor {info.name!r} {list(info.shape)} is not a 3-D expert stack")
    experts, x, y = info.shape
    if shape is None:  # the rule alone says which way round it is stored
        shape = (experts, y, x) if rule.transposed else (experts, x, y)
    shape = tuple(shape)
    # transformers' Transpose(check_dims=True) leaves a tensor that already has the module's shape as it is
    transposed = info.shape != shape and (experts, y, x) == shape
    if not transposed and info.shape != shape:
        raise ShardmergeError(
            f"base tensor {info.name!r} {list(info.shape)} does not hold the expert parameter {list(shape)}"
        )
    return shape, [(info.name, ExpertSlice(0, experts, 0, shape[1], transposed, rule.interleaved))]


# -- factors ------------------------------------------------------------------------------------------------


def narrowed_reads(a: TensorInfo, b: TensorInfo, experts: int, swap: bool, part: ExpertSlice):
    """The parts of lora_A and lora_B a base tensor's slice needs, as contiguous byte ranges: A_e for its experts
    (rows e*r .. of A), and when swapped only its rows of B (B's rows are d1 then). B's expert columns are
    strided, so B keeps every expert's columns."""
    rank = a.shape[0] // experts
    a = a.rows(part.first * rank, (part.first + part.count) * rank)
    return a, (b.rows(part.start, part.stop) if swap else b)


def expert_factors(a, b, experts: int, layout: str, swap: bool, part: ExpertSlice):
    """(left (n, rows, r), right (n, r, d2)) with ΔP[e] restricted to `part`'s rows = left[e] @ right[e], for
    the n experts `part` holds, unscaled, from the `narrowed_reads` of PEFT's packed lora_A (r*E, a) and
    lora_B (b, r*E)."""
    rank = b.shape[1] // experts
    a_e = a.reshape(part.count, rank, a.shape[1])  # A_e: rows e*r .. e*r+r-1
    chosen = slice(part.first, part.first + part.count)
    if layout == GROUPED_BY_EXPERT:  # Unsloth: B_e in columns e*r + k
        b_e = b.reshape(b.shape[0], experts, rank)[:, chosen].permute(1, 0, 2)
    else:  # PEFT: B_e in columns k*E + e
        b_e = b.reshape(b.shape[0], rank, experts)[:, :, chosen].permute(2, 0, 1)
    left, right = (b_e, a_e) if swap else (a_e.transpose(1, 2), b_e.transpose(1, 2))
    first_row = part.start if swap else 0  # B already holds only the slice's rows
    return left[:, [row - first_row for row in part.row_order()]], right
