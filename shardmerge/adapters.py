"""A PEFT LoRA adapter as shardmerge sees it: modules (A, B and extras) with their scaling, and
replacement tensors, all read from adapter_config.json and the adapter file's header.

Key conventions follow PEFT's save format: a `base_model.model.` prefix, the adapter name stripped on
save (but tolerated when present), `lora_A/lora_B(.weight|.bias)`, `lora_embedding_A/B`,
`lora_magnitude_vector` (DoRA), and plain or `base_layer.`/`modules_to_save.` tensors that replace
base tensors (modules_to_save, trained biases, saved embedding layers).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ShardmergeError
from .experts import ParamLora, is_param_module, strip_base_layers
from .safetensors_io import TensorInfo
from .sources import AdapterFiles
from .ties import OUTPUT_EMBEDDINGS

PEFT_PREFIX = "base_model.model."
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E")
# The PEFT types merged here: LoRA, and AdaLoRA (an SVD-shaped LoRA: B @ (A * E), its own scaling).
_MERGED_TYPES = ("LORA", "ADALORA")
# Where each saved part goes on a LoraModule, by (part, parameter): LoRA's are nn.Linear/Embedding parameters;
# AdaLoRA saves bare nn.Parameters (`m.lora_A`, `m.lora_B`, `m.lora_E`).
_SLOTS = {("lora_A", "weight"): "a", ("lora_B", "weight"): "b", ("lora_B", "bias"): "b_bias",
          ("lora_embedding_A", ""): "a", ("lora_embedding_B", ""): "b",
          ("lora_magnitude_vector", ""): "magnitude", ("lora_magnitude_vector", "weight"): "magnitude"}  # fmt: skip
_ADALORA_SLOTS = {("lora_A", ""): "a", ("lora_B", ""): "b", ("lora_E", ""): "singular"}
# Config keys naming LoRA variants whose merge is not W + s*B@A (or DoRA), or layers PEFT builds differently
# (megatron_config: Megatron's parallel linears); merging them as plain LoRA would silently produce a wrong
# model, so they are refused by name. VeLoRA, MonteCLoRA and MiCA merge as plain LoRA (their variants'
# merge_safe adds get_delta_weight), so they are not here.
_UNSUPPORTED_VARIANTS = (
    "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "alora_invocation_tokens", "layer_replication",
    "megatron_config",
)  # fmt: skip
# Tensors a variant keeps for training only, which its merge does not read (VeLoRA's compression
# embedding, MonteCLoRA's sampler).
_TRAINING_ONLY = (".lora_velora_embed", ".lora_monteclora_sampler.")
# init_lora_weights values after which PEFT, loading the adapter, re-runs the initialisation: it rewrites the
# base weight (PiSSA/OLoRA/CorDA: W - s*B0@A0; LoftQ: a quantized residual) and merges into that.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraModule:
    module: str  # module path as the adapter names it, PEFT prefix removed
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    b_bias: TensorInfo | None = None  # lora_bias=True
    magnitude: TensorInfo | None = None  # DoRA
    singular: TensorInfo | None = None  # AdaLoRA's lora_E
    embedding: bool = False  # lora_embedding_A/B: the delta is (B @ A)^T
    scaling: float = 0.0
    rank: int = 0


@dataclass
class Adapter:
    path: str
    weight: float
    config: dict
    weights: Path  # the adapter's safetensors file
    original: Path | None = None  # the file the user gave: weights itself, or the legacy .bin it was converted from
    modules: list[LoraModule] = field(default_factory=list)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)  # target name -> tensor
    own_copies: set[str] = field(default_factory=set)  # replacements that are a modules_to_save module's own copy
    warnings: list[str] = field(default_factory=list)  # tensors PEFT ignores, and merges the user should check
    token_rows: dict[str, tuple[tuple[int, ...], TensorInfo]] = field(default_factory=dict)  # module -> rows, values
    param_loras: list[ParamLora] = field(default_factory=list)  # target_parameters (experts.py)
    peft_version: str | None = None  # the PEFT version that saved it: the plan's, else adapter_config.json's

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (utils.other.get_pattern_key): the first pattern key that matches the end of the
    module name as a regex, on a dot boundary, wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def is_adalora(config: dict) -> bool:
    return str(config.get("peft_type", "LORA")).upper() == "ADALORA"


def adalora_scaling(config: dict, rank: int, where: Path) -> float:
    """AdaLoRA's (SVDLinear): lora_alpha (or the rank when it is not positive) / (ranknum + 1e-5), where ranknum
    is init_r whatever rank the budget kept (resize_modules_by_rank_pattern keeps it); no rsLoRA, no patterns."""
    alpha, init_r = config.get("lora_alpha", 8), config.get("init_r", 12)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r <= 0:
        raise ShardmergeError(f"{where}: init_r={init_r!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ShardmergeError(f"{where}: lora_alpha={alpha!r} is not a number")
    ranknum = float(_float32(init_r) + _float32(1e-5))  # PEFT adds in the float32 ranknum parameter
    return (alpha if alpha > 0 else float(rank)) / ranknum


def _float32(x: float) -> float:
    """x rounded to float32, as PEFT's float32 parameters hold it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(rank, scaling) for one module: alpha/r, or alpha/sqrt(r) with rsLoRA, after rank/alpha patterns."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ShardmergeError(f"rank r={r!r} for module {module!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ShardmergeError(f"lora_alpha={alpha!r} for module {module!r} is not a number")
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    # Not NaN, inf or an integer too large for a float (JSON has no limit; the scaling would overflow).
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _rank(v) -> bool:
    """A positive rank, or the mask of kept ranks AdaLoRA's budget saves."""
    return _whole(v) and v > 0 or isinstance(v, list) and all(isinstance(x, bool) for x in v)


def _token_ids(v) -> bool:
    return isinstance(v, list) and all(_whole(x) and x >= 0 for x in v)


# The value types of the LoraConfig fields read here (PEFT's annotations): a config PEFT would not build, or would
# read differently from what it says ("false" is true), is refused naming the field instead of guessed at.
_FIELDS = {
    "r": (lambda v: _whole(v) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _names(v), "a regex or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _names(v), "a regex or a list of module names"),
    "modules_to_save": (lambda v: v is None or _names(v), "a list of module names"),
    "target_parameters": (lambda v: v is None or _names(v), "a list of parameter names"),
    "layers_to_transform": (lambda v: v is None or _whole(v) or _token_ids(v), "a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _names(v), "a name or a list of names"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_rank, v.values())),
                     "a mapping of module patterns to ranks"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(map(_number, v.values())),
                      "a mapping of module patterns to numbers"),
    "trainable_token_indices": (lambda v: v is None or _token_ids(v) or isinstance(v, dict)
                                and all(_token_ids(x) for x in v.values()), "a list of token ids or a mapping of them"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "one of none, all, lora_only"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an initialisation name"),
    **{key: (lambda v: v is None or isinstance(v, bool), "true or false")
       for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "ensure_weight_tying")},
}  # fmt: skip


def _check_fields(config: dict, where: Path) -> None:
    for key, (valid, what) in _FIELDS.items():
        if key in config and not valid(config[key]):
            raise ShardmergeError(f"{where}: {key} must be {what}, got {config[key]!r}")
    patterns = [config.get(k) for k in ("target_modules", "exclude_modules") if isinstance(config.get(k), str)]
    for key in ("rank_pattern", "alpha_pattern", "trainable_token_indices"):
        patterns += list(config.get(key) or {}) if isinstance(config.get(key), dict) else []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ShardmergeError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None


def check_config(files: AdapterFiles) -> None:
    config, where = files.config, files.directory / "adapter_config.json"
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() not in _MERGED_TYPES:
        raise ShardmergeError(f"{where}: peft_type is {peft_type!r}; shardmerge merges LoRA and AdaLoRA adapters only")
    _check_fields(config, where)
    for key in _UNSUPPORTED_VARIANTS:
        if config.get(key) not in (None, False, {}, []):
            raise ShardmergeError(
                f"{where}: {key}={config[key]!r} is a LoRA variant shardmerge cannot merge "
                "exactly; merge it with PEFT instead"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        if init.lower() == "loftq":
            way_out = (
                "merge into the base LoftQ produced (save it after get_peft_model) with init_lora_weights: "
                "true in adapter_config.json"
            )
        else:
            way_out = (
                "re-save the adapter with save_pretrained(..., path_initial_model_for_weight_conversion=<the "
                "adapter saved right after initialisation>), which writes a plain rank-2r LoRA that merges here"
            )
        raise ShardmergeError(
            f"{where}: init_lora_weights={init!r} was saved unconverted: PEFT re-runs that "
            f"initialisation on load, changing the base weights before merging; {way_out}"
        )


def config_warnings(files: AdapterFiles) -> list[str]:
    """What PEFT merges as given but the user may not expect."""
    if files.config.get("init_lora_weights") == "lora_ga":
        return [
            f"{files.directory / 'adapter_config.json'}: init_lora_weights='lora_ga' changed the base weights "
            "when training started; like PEFT, this merges into the base given, so it must be the base saved "
            "after LoRA-GA initialisation (or re-save the adapter with path_initial_model_for_weight_conversion)"
        ]
    return []


def peft_creates(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on `module` for this config (tuners_utils.check_target_module_exists):
    target_modules (a regex matched whole, or names matched on a dot boundary), less exclude_modules and
    modules_to_save, within layers_to_transform; with ensure_weight_tying also the head tied to a targeted
    embedding (its layer shares the embedding's A and B). A config that names no targets is trusted."""
    if config.get("ensure_weight_tying") and module.split(".")[-1] in OUTPUT_EMBEDDINGS:
        return True
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and any(module == e or module.endswith("." + e) for e in exclude):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, module) is not None
    if not targets:
        return True
    if module in targets:
        return True
    return any(module.endswith("." + t) for t in targets) and _in_layers_to_transform(config, module)


def _names_module(config: dict, module: str) -> bool:
    """Whether target_modules itself names `module`: then its LoRA is a layer's, not a ParamWrapper's, even when
    a bare parameter name in target_parameters (`down_proj`, as PEFT's all-linear adds for MoE) could match it;
    PEFT refuses to wrap a parameter of a module target_modules already adapted."""
    return bool(config.get("target_modules")) and peft_creates(config, module)


def _in_layers_to_transform(config: dict, module: str) -> bool:
    """PEFT's layers_to_transform rule: the first numbered segment (after layers_pattern, if given) is the
    layer index, and a module without one is not in any listed layer."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = None if patterns else re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
        if found:
            break
    if found is None:
        return False
    index = int(found.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _follow_config(files: AdapterFiles, module: LoraModule) -> list[str]:
    """Tensors the config says PEFT does not build are ignored, as PEFT's load ignores unexpected keys; a DoRA
    magnitude the config needs but the file lacks is refused (PEFT would keep its initial norms of W)."""
    config, notes = files.config, []
    if module.magnitude is not None and not config.get("use_dora"):
        notes.append(f"lora_magnitude_vector of {module.module!r} (use_dora is false)")
        module.magnitude = None
    elif module.magnitude is None and config.get("use_dora"):
        raise ShardmergeError(
            f"{files.weights}: module {module.module!r} has no lora_magnitude_vector, but "
            f"{files.directory / 'adapter_config.json'} says use_dora: true; re-save the adapter "
            "with PEFT or fix use_dora"
        )
    if module.b_bias is not None and not config.get("lora_bias"):
        notes.append(f"lora_B.bias of {module.module!r} (lora_bias is false)")
        module.b_bias = None
    return notes


def _split_key(key: str) -> tuple[str, str, str] | None:
    """'m.lora_A.weight' -> ('m', 'lora_A', 'weight'); adapter-name segments are dropped."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _LORA_PARTS and i > 0:
            rest = parts[i + 1 :]
            if len(rest) == 2:  # lora_A.<adapter name>.weight
                rest = rest[1:]
            if len(rest) == 1 and rest[0] not in ("weight", "bias"):  # lora_embedding_A.<adapter name>
                rest = []
            param = rest[0] if rest else ""
            if len(rest) > 1:
                return None
            return ".".join(parts[:i]), part, param
    return None


def _saved_twice(name: str, saved: dict) -> bool:
    """A modules_to_save copy's tensor under its in-memory name (`m.modules_to_save.<adapter>.x`, which
    bias="all"/"lora_only" saves beside the copy), when the copy itself is saved as `m.x` too: PEFT's load
    writes `m.x` over it (ModulesToSaveWrapper.adapter_state_dict_load_map), so only `m.x` counts."""
    plain = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name, count=1)
    return plain != name and (plain in saved or PEFT_PREFIX + plain in saved)


def _replacement_target(key: str) -> str:
    """The base tensor a saved full tensor stands for: drop base_layer./modules_to_save.<name>. wrappers."""
    key = key.replace(".base_layer.", ".")
    match = re.match(r"(.*)\.modules_to_save\.(?:[^.]+\.)?([^.]+)$", key)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    return key


# peft.utils.constants.EMBEDDING_LAYER_NAMES: ensure_weight_tying ties modules_to_save copies only when an entry
# ends with one of these (BaseTuner._check_tied_modules); otherwise PEFT warns and copies as usual.
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _own_copy(config: dict, key: str, target: str) -> bool:
    """Whether a saved tensor is a modules_to_save module's copy, which PEFT keeps apart from any module the
    base ties to it (unless ensure_weight_tying ties the copies too). PEFT wraps every module whose name ends
    with an entry (utils.other._set_trainable); a saved base layer (`.base_layer.`) is not a copy."""
    saved = [m for m in config.get("modules_to_save") or [] if isinstance(m, str)]
    ties_copies = config.get("ensure_weight_tying") and any(m.split(".")[-1] in _PEFT_EMBEDDING_NAMES for m in saved)
    if ties_copies or ".base_layer." in key:
        return False
    module = target.rpartition(".")[0]
    return any(module.endswith(m) for m in saved)


_TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def _token_indices(files: AdapterFiles, module: str, values: TensorInfo) -> tuple[int, ...]:
    """The embedding rows a trainable-tokens delta replaces: `trainable_token_indices` is a list (for the
    input embedding) or a mapping from module-name patterns to lists, as in PEFT's LoraConfig."""
    spec = files.config.get("trainable_token_indices")
    if isinstance(spec, dict):  # PEFT's pattern rule; a single entry stands for the one embedding saved
        spec = pattern_value(spec, module, next(iter(spec.values())) if len(spec) == 1 else None)
    if not isinstance(spec, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        raise ShardmergeError(
            f"{files.directory / 'adapter_config.json'}: trainable_token_indices gives no list of "
            f"token ids for {module!r}"
        )
    if len(set(spec)) != len(spec):
        raise ShardmergeError(
            f"{files.directory / 'adapter_config.json'}: trainable_token_indices for {module!r} "
            "lists a token id twice; PEFT cannot train one row twice"
        )
    if len(values.shape) != 2 or values.shape[0] != len(spec):
        raise ShardmergeError(
            f"{files.weights}: {values.name!r} {list(values.shape)} does not hold one row for each "
            f"of the {len(spec)} trainable_token_indices"
        )
    return tuple(spec)


def load_adapter(files: AdapterFiles, path: str, weight: float) -> Adapter:
    check_config(files)
    adapter = Adapter(path=path, weight=weight, config=files.config, weights=files.weights)
    modules = _sort_tensors(files, adapter)
    ignored = _settle_modules(files, adapter, modules)
    if ignored:
        adapter.warnings.append(
            f"{files.weights}: ignoring {len(ignored)} sets of tensors that PEFT's load ignores too, e.g. {ignored[0]}"
        )
    adapter.warnings += config_warnings(files)
    if not adapter.modules and not adapter.replacements and not adapter.token_rows and not adapter.param_loras:
        raise ShardmergeError(f"{files.weights}: adapter holds no tensors")
    return adapter


def _sort_tensors(files: AdapterFiles, adapter: Adapter) -> dict[str, LoraModule]:
    """Each saved tensor to its place: trainable-token rows and replacements go on `adapter`, LoRA parts are
    gathered per module and returned."""
    modules: dict[str, LoraModule] = {}
    for key, tensor in files.header.tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if any(part in name for part in _TRAINING_ONLY):
            continue
        if name.endswith(_TOKEN_DELTA):
            module_name = name[: -len(_TOKEN_DELTA)]
            adapter.token_rows[module_name] = (_token_indices(files, module_name, tensor), tensor)
            continue
        split = _split_key(name)
        if split is None:
            if any(part in name.split(".") for part in _LORA_PARTS) or ".original_module." in name:
                if ".original_module." in name:
                    continue  # PEFT's untouched copy of a modules_to_save module; the base already has it
                raise ShardmergeError(f"{files.weights}: cannot interpret adapter tensor {key!r}")
            if _saved_twice(name, files.header.tensors):
                continue
            target = _replacement_target(name)
            adapter.replacements[target] = tensor
            if _own_copy(files.config, name, target):
                adapter.own_copies.add(target)
            continue
        module_name, part, param = split
        module = modules.setdefault(module_name, LoraModule(module=module_name))
        slot = (_ADALORA_SLOTS if is_adalora(files.config) else _SLOTS).get((part, param))
        if slot is None:
            raise ShardmergeError(f"{files.weights}: cannot interpret adapter tensor {key!r}")
        if getattr(module, slot) is not None:
            raise ShardmergeError(f"{files.weights}: module {module_name!r} has two {part} tensors")
        setattr(module, slot, tensor)
        module.embedding = module.embedding or part.startswith("lora_embedding")
    return modules


def _settle_modules(files: AdapterFiles, adapter: Adapter, modules: dict[str, LoraModule]) -> list[str]:
    """Keep the modules PEFT would build, as its config says, with their scaling; returns what was ignored."""
    targets = list(files.config.get("target_parameters") or [])
    ignored = []
    for module in modules.values():
        if targets and is_param_module(module.module, targets) and not _names_module(files.config, module.module):
            _check_param_module(files, module)
            owner, depth = strip_base_layers(module.module)
            adapter.param_loras.append(ParamLora(owner, depth, module.a, module.b))
            continue
        if not peft_creates(files.config, module.module):
            ignored.append(f"the LoRA tensors of {module.module!r} (not a target of adapter_config.json)")
            continue
        ignored += _follow_config(files, module)
        if module.module in adapter.token_rows:
            raise ShardmergeError(
                f"{files.weights}: {module.module!r} carries both LoRA and trainable tokens, which "
                "PEFT does not build on one embedding; train one of them"
            )
        if module.a is None or module.b is None:
            missing = "A" if module.a is None else "B"
            raise ShardmergeError(f"{files.weights}: module {module.module!r} has no lora_{missing} tensor")
        module.rank = module.a.shape[0] if module.a.shape else 0
        if is_adalora(files.config):
            _check_singular(files, module)
            where = files.directory / "adapter_config.json"
            rank, module.scaling = module.rank, adalora_scaling(files.config, module.rank, where)
        else:
            rank, module.scaling = module_scaling(files.config, module.module)
        if module.rank != rank or module.b.shape[1:2] != (rank,):
            raise ShardmergeError(f"{files.weights}: module {module.module!r} {_rank_mismatch(module, rank)}")
        adapter.modules.append(module)
    return ignored


def _rank_mismatch(module: LoraModule, rank: int) -> str:
    shapes = f"lora_A {list(module.a.shape)}, lora_B {list(module.b.shape)}"
    inner = module.b.shape[1] if len(module.b.shape) > 1 else 0
    if module.rank == rank and len(module.b.shape) > 2 and 0 < inner < rank and rank % inner == 0:
        # PEFT's LoRA on a grouped convolution: lora_B is a grouped conv taking r/groups channels per group.
        return (
            f"is a convolution with groups={rank // inner} ({shapes}); PEFT cannot merge LoRA into a grouped "
            "convolution (its merge raises), so neither does shardmerge: leave that layer out of target_modules"
        )
    return f"has rank {module.rank} ({shapes}) but adapter_config.json gives r={rank}"


def _check_singular(files: AdapterFiles, module: LoraModule) -> None:
    """AdaLoRA keeps its singular values in lora_E (r, 1), one per kept rank."""
    if module.singular is None or module.singular.shape != (module.rank, 1):
        got = "none" if module.singular is None else list(module.singular.shape)
        raise ShardmergeError(
            f"{files.weights}: AdaLoRA module {module.module!r} needs lora_E [{module.rank}, 1] beside "
            f"lora_A {list(module.a.shape)}, got {got}"
        )


def _check_param_module(files: AdapterFiles, module: LoraModule) -> None:
    """PEFT's ParamWrapper saves exactly lora_A.weight and lora_B.weight (it refuses bias, DoRA, embeddings)."""
    if (
        module.a is None
        or module.b is None
        or module.b_bias is not None
        or module.magnitude is not None
        or module.embedding
        or len(module.a.shape) != 2
        or len(module.b.shape) != 2
    ):
        raise ShardmergeError(
            f"{files.weights}: {module.module!r} is a target_parameters module but does not hold "
            "exactly a 2-D lora_A.weight and lora_B.weight"
        )
