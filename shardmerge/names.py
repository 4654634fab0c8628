"""Adapter tensor names -> base checkpoint tensor names.

An adapter names tensors as the model's modules are named in memory; the base checkpoint names them as
they are stored. The two differ wherever transformers renames keys at load through its checkpoint
conversion mapping: vision-language models (`language_model.model.layers...` on disk for the LLaVA family,
`model.language_model.layers...` in memory; `model.layers...` + `visual...` for Qwen2-VL), vision towers
that drop a `vision_model.` level, Mixtral's `block_sparse_moe.` -> `mlp.`. PEFT renames adapter keys with
the same rules, so shardmerge matches in the module namespace: both names go through the model's renaming
rules (`Renames.to_module`), and the one base tensor that lands on the adapter's module name is the target.
Output names stay the base's.

`BaseNames.require(name, ...)` returns the one base tensor an adapter name stands for, or raises naming the
adapter file and key. `checkpoint_renames(config)` gives the renaming rules of a model on their own (for
code that maps checkpoint keys to module keys for other purposes, e.g. expert layouts).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ShardmergeError
from .sources import BaseModel, architecture, special_floats


@dataclass(frozen=True)
class Rule:
    """One checkpoint -> module renaming, applied exactly as transformers applies a WeightRenaming: the
    first match of `pattern` is searched (a pattern ending in a letter or digit ends on a name boundary) and
    its text replaced once by `replacement`, where `\\1` stands for the first group inside the matched branch.
    A scoped rule acts only on keys under one sub-model (`scope`, a module path below the base-model prefix;
    "" is the base model itself), and only on the part of the key below it."""

    pattern: str
    replacement: str
    scope: str | None = None
    base_prefix: str = "model"  # the model's base_model_prefix, which a scoped key may carry or not

    def apply(self, source_key: str) -> str:
        prefix, key = "", source_key
        if self.scope is not None:
            scope = f"{self.scope}." if self.scope else ""
            base = f"{self.base_prefix}." if self.base_prefix else ""
            for candidate in (base + scope, scope):
                if source_key.startswith(candidate):
                    prefix, key = candidate, source_key[len(candidate) :]
                    break
            else:
                return source_key
        pattern = self.pattern + (r"(?!\w)" if re.search(r"[a-zA-Z0-9]$", self.pattern) else "")
        match = re.search(pattern, key)
        if match is None:
            return source_key
        replacement = self.replacement
        if r"\1" in replacement:  # transformers' alternations name each branch; \1 is the group inside it
            branch = next((name for name, text in match.groupdict().items() if text is not None), None)
            inner = match.re.groupindex[branch] + 1 if branch else 1
            replacement = replacement.replace(r"\1", match.group(inner) or "")
        return prefix + key.replace(match.group(0), replacement, 1)


@dataclass(frozen=True)
class Renames:
    """A model's checkpoint -> module key renaming: every rule applied in order, each at most once."""

    family: str  # what the rules were chosen by, for messages
    source: str  # "transformers X.Y" or "built-in table"
    rules: tuple[Rule, ...]

    def to_module(self, key: str) -> str:
        for rule in self.rules:
            key = rule.apply(key)
        return key


# ---- the built-in table: transformers 5's rules for the common families, used when transformers is absent
# (or does not know the architecture). tests/test_names.py checks it against transformers for every family.


def _llava_rules(towers: Sequence[str] = ("vision_tower", "multi_modal_projector")) -> tuple[Rule, ...]:
    """LlavaForConditionalGeneration and the families transformers maps like it: the hub layout keeps the
    language model's own `model.`/`lm_head` under `language_model.`; in memory the towers sit under `model.`."""
    return (
        Rule(r"^language_model.lm_head", "lm_head"),
        Rule(r"^language_model", "model.language_model"),
        *(Rule(rf"^{tower}", f"model.{tower}") for tower in towers),
        Rule(r"^language_model.model", "language_model", scope=""),  # LlavaModel's own rule
    )


_QWEN2_VL = (
    Rule(r"^visual", "model.visual"),
    Rule(r"^model(?!\.(language_model|visual))", "model.language_model"),
    Rule(r"^model\.(?:(?!language_model\.))(.+)", r"model.language_model.\1", scope=""),  # Qwen2VLModel's
)
_MIXTRAL = (Rule(r".block_sparse_moe.", ".mlp."),)
_LLAVA_NEXT = _llava_rules(("vision_tower", "multi_modal_projector", "image_newline"))


@dataclass(frozen=True)
class _Family:
    rules: tuple[Rule, ...]
    # sub-config key -> the module path (below the base-model prefix) of the sub-model built from it
    submodels: tuple[tuple[str, str], ...] = (("vision_config", "vision_tower"), ("text_config", "language_model"))


_FAMILIES = {
    "llava": _Family(_llava_rules()),
    "vipllava": _Family(_llava_rules()),
    "aya_vision": _Family(_llava_rules()),
    "mistral3": _Family(_llava_rules()),
    "gemma3": _Family(_llava_rules()),
    "paligemma": _Family(_llava_rules()),
    "internvl": _Family(_llava_rules()),
    "mllama": _Family(
        _llava_rules(("vision_model", "multi_modal_projector")),
        (("vision_config", "vision_model"), ("text_config", "language_model")),
    ),
    "llava_next": _Family(_LLAVA_NEXT),
    "llava_next_video": _Family(_LLAVA_NEXT),
    "llava_onevision": _Family(_LLAVA_NEXT),
    "Qwen2VLForConditionalGeneration": _Family(_QWEN2_VL, ()),
    "Qwen2_5_VLForConditionalGeneration": _Family(_QWEN2_VL, ()),
    "mixtral": _Family(_MIXTRAL, ()),
}
# Rules of sub-models (by their config's model_type), relative to where the family puts them.
_SUBMODEL_RULES = {
    "clip_vision_model": (Rule(r"^vision_model\.(.+)", r"\1"),),  # transformers 5 flattened the tower
    "siglip_vision_model": (Rule(r"^vision_model\.(.+)", r"\1"),),
    "mixtral": _MIXTRAL,
}
# transformers adds these to every model's rules (older checkpoint spellings).
_LEGACY = (
    Rule("LayerNorm.gamma", "LayerNorm.weight"),
    Rule("LayerNorm.beta", "LayerNorm.bias"),
    Rule(".weight_g", ".parametrizations.weight.original0"),
    Rule(".weight_v", ".parametrizations.weight.original1"),
    Rule(r"^language_model\.model\.model|^model\.language_model\.model", "model.language_model"),
)


def _table_family(config: dict) -> str | None:
    """The config's family in the built-in table: by architecture, else by model_type."""
    return next((n for n in (architecture(config), config.get("model_type")) if n in _FAMILIES), None)


def _table_renames(config: dict) -> Renames | None:
    """The built-in rules for the config's family, with the rules of its nested sub-models (e.g. a Mixtral
    text_config inside a LLaVA) scoped to where the family puts them."""
    name = _table_family(config)
    if name is None:
        return None
    family = _FAMILIES[name]
    rules = list(family.rules)
    for key, module in family.submodels:
        sub = config.get(key)
        sub_type = sub.get("model_type") if isinstance(sub, dict) else None
        rules += [Rule(r.pattern, r.replacement, scope=module) for r in _SUBMODEL_RULES.get(sub_type, ())]
    return Renames(name, "built-in table", tuple(rules) + _LEGACY)


_NOT_KNOWN = object()  # transformers is not installed, or cannot build this architecture
_PROBE_TIMEOUT_S = 300
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "depth", "num_global_layers")


def _most_layers(config: dict) -> int:
    """The largest layer count anywhere in the config tree."""
    counts = [v for k, v in config.items() if k in _LAYER_COUNT_KEYS and isinstance(v, int)]
    counts += [_most_layers(v) for v in config.values() if isinstance(v, dict)]
    return max(counts, default=0)


def _transformers_renames(config: dict, max_layers: int | None):
    """transformers' own rules for this model (None: it has none), or _NOT_KNOWN. The rules depend on which
    sub-models the model holds and where, so transformers builds the model and is asked, as PEFT and
    from_pretrained ask it. Unless the caller has imported transformers already, that happens in a child
    process: importing it and building even a meta-device model would stay in this process's memory, which
    max_memory bounds. A config claiming more layers than `max_layers` (the checkpoint's tensor count: every
    layer stores some) is not built."""
    if max_layers is not None and _most_layers(config) > max_layers:
        return _NOT_KNOWN
    if "transformers" in sys.modules:
        return _from_answer(_transformers_rules(config))
    if importlib.util.find_spec("transformers") is None:
        return _NOT_KNOWN
    return _probe_cached(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _probe_cached(config_json: str):
    """_transformers_rules in a child process (once per config: plans are built more than once per run)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    try:
        child = subprocess.run([sys.executable, "-c", "from shardmerge.names import _probe; _probe()"],
                               input=config_json, capture_output=True, text=True, env=env, check=False,
                               timeout=_PROBE_TIMEOUT_S)  # fmt: skip
        answer = json.loads(child.stdout) if child.returncode == 0 else _NOT_KNOWN
    except (OSError, subprocess.SubprocessError, ValueError):
        answer = _NOT_KNOWN
    return _from_answer(answer)


def _from_answer(answer):
    """Renames from what _transformers_rules answered (None: no rules; _NOT_KNOWN: it cannot tell)."""
    if not isinstance(answer, dict) or "rules" not in answer:
        return _NOT_KNOWN
    if answer["rules"] is None:
        return None
    try:
        rules = tuple(Rule(r["pattern"], r["replacement"], r["scope"], r["base_prefix"]) for r in answer["rules"])
        return Renames(str(answer["family"]), f"transformers {answer['version']}", rules)
    except (KeyError, TypeError):
        return _NOT_KNOWN


def _probe() -> None:
    """The child process: the config on stdin, transformers' renaming rules for it on stdout as JSON
    ({"rules": null} when it has none); a non-zero exit when it cannot tell."""
    answer = _transformers_rules(json.load(sys.stdin))
    if answer is _NOT_KNOWN:
        sys.exit(3)
    print(json.dumps(answer))


def _transformers_rules(config: dict):
    """transformers' renaming rules for the config as JSON-able data ({"rules": None}: it has none), or
    _NOT_KNOWN."""
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # no transformers, or one older than 5 (no conversion tables): the built-in table
        return _NOT_KNOWN
    architecture_name, model_type = architecture(config), config.get("model_type")
    model_class = getattr(transformers, architecture_name, None) if architecture_name.isidentifier() else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        return _NOT_KNOWN
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return _NOT_KNOWN
    if all(get_checkpoint_conversion_mapping(n) is None for n in (architecture_name, model_type)):
        return {"rules": None}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = model_class(CONFIG_MAPPING[model_type].from_dict(special_floats(config)))
        conversions = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a config it cannot build (remote code, another version's keys)
        return _NOT_KNOWN
    finally:
        transformers.logging.set_verbosity(verbosity)
    renames = [c for c in conversions if isinstance(c, WeightRenaming)]
    if any(type(c) not in (WeightRenaming, PrefixChange) for c in renames):
        return _NOT_KNOWN  # a stateful or index-shifting renaming that a Rule cannot carry
    rules = [{"pattern": c.compiled_sources.pattern, "replacement": c.target_patterns[0], "scope": c.scope_prefix,
              "base_prefix": c.base_model_prefix or ""} for c in renames]  # fmt: skip
    return {"family": architecture_name, "version": transformers.__version__, "rules": rules}


def checkpoint_renames(config: dict, max_layers: int | None = None) -> Renames | None:
    """The model's checkpoint -> module key renaming: transformers' own tables when transformers (5 or
    later) is installed and knows the architecture, else the built-in table; None when there is none."""
    found = _transformers_renames(config, max_layers)
    return _table_renames(config) if found is _NOT_KNOWN else found


def _is_composite(config: dict) -> bool:
    """Whether the config nests sub-model configs (text_config, vision_config, ...), as every VLM's does."""
    return any(isinstance(v, dict) and "model_type" in v for v in config.values())


class BaseNames:
    """Finds the base tensor an adapter names.

    In order: the adapter's module name renamed to the one base tensor that transformers loads into that
    module (for composite models, and models with built-in rules, this is checked for every name, so a
    checkpoint holding one tensor under two layouts is refused rather than half-merged; for others only
    when no tensor has the exact name, since transformers is then consulted), the exact name, a model-class
    prefix that differs between the adapter's model and the base (`model.` present in one and not the
    other). A tied output embedding the base does not store is ties.py's concern."""

    def __init__(self, base: BaseModel):
        self.base = base
        config = base.config
        self._eager = _is_composite(config) or _table_family(config) is not None
        self._renames: Renames | None = None
        self._by_module: dict[str, list[str]] | None = None

    @property
    def renames(self) -> Renames | None:
        """The base model's renaming rules, looked up once, when first needed."""
        if self._by_module is None:
            self._renames = checkpoint_renames(self.base.config, max_layers=len(self.base.tensors))
            self._by_module = {}
            if self._renames is not None:
                for name in self.base.tensors:
                    self._by_module.setdefault(self._renames.to_module(name), []).append(name)
        return self._renames

    def candidates(self, name: str) -> tuple[list[str], str]:
        """Every base tensor `name` may stand for, and by which rule ("renamed", "exact", "prefix");
        more than one tensor is an ambiguity the caller reports."""
        tensors = self.base.tensors
        if self._eager or name not in tensors:
            renames = self.renames
            hits = self._by_module.get(renames.to_module(name), []) if renames is not None else []
            if hits:
                return sorted(hits), "renamed"
        if name in tensors:
            return [name], "exact"
        prefixed = [n for n in tensors if n.endswith("." + name) or name.endswith("." + n)]
        return sorted(prefixed), "prefix"

    def find(self, name: str) -> str | None:
        found, _ = self.candidates(name)
        if len(found) > 1:
            raise ShardmergeError(
                f"{name!r} matches several base tensors ({', '.join(found[:6])}); "
                "the adapter and base checkpoint layouts are ambiguous"
            )
        return found[0] if found else None

    def require(self, name: str, adapter_file: Path, key: str) -> str:
        found, how = self.candidates(name)
        if len(found) > 1:
            if how == "renamed":
                why = (
                    f"through {self.renames.family}'s checkpoint renames ({self.renames.source}): the base "
                    "checkpoint stores that tensor under more than one layout; keep one of them"
                )
            else:
                why = "by a model-class prefix: the adapter and base checkpoint layouts are ambiguous"
            raise ShardmergeError(
                f"{adapter_file}: adapter tensor {key!r} targets {name!r}, which matches several "
                f"base tensors {why} ({', '.join(found[:6])})"
            )
        if not found:
            close = difflib.get_close_matches(name, list(self.base.tensors), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise ShardmergeError(
                f"{adapter_file}: adapter tensor {key!r} targets {name!r}, which is not in the "
                f"base model {self.base.directory}{hint}"
            )
        return found[0]
