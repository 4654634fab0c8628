"""The plan file: its keys, declared once, validated, and turned into CLI overrides.

Each option is one field of Plan (its parser and help in the field's metadata), one key of the YAML plan and
one command-line flag; OPTIONS is derived from the fields. Relative paths are resolved against the plan file's
directory (or the working directory for a dict).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Hashable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PlanError
from .stores import is_url
from .units import GiB, parse_size

DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")


def _device(value: Any, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise PlanError(f"{key}: expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _dtype(value: Any, key: str) -> str:
    if value not in DTYPE_CHOICES:
        raise PlanError(f"{key}: expected one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise PlanError(f"{key}: expected true or false, got {value!r}")


def _str(value: Any, key: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise PlanError(f"{key}: expected a path, got {value!r}")
    return os.fspath(value)


def _size_or(word: str) -> Callable[[Any, str], int | str]:
    def parse(value: Any, key: str) -> int | str:
        return word if value == word else parse_size(value, key)

    return parse


def _option(parse: Callable[[Any, str], Any], help: str, default: Any = MISSING):
    """A Plan field that is also a plan key and a command-line flag."""
    return field(default=default, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class AdapterSpec:
    path: str  # a local directory, or a Hub repo id (optionally @revision)
    weight: float = 1.0
    # The PEFT version that trained the adapter, when adapter_config.json lacks it: it decides how expert
    # LoRA (target_parameters) on square experts is oriented.
    peft_version: str | None = None


@dataclass(frozen=True)
class Plan:
    base: str
    adapters: tuple[AdapterSpec, ...]
    output: str = _option(_str, "output directory for the merged model")
    device: str = _option(_device, "auto | cpu | cuda | cuda:N", "auto")
    dtype: str = _option(_dtype, "output dtype of floating tensors: keep | bfloat16 | float16 | float32", "keep")
    max_memory: int = _option(parse_size, "host-RAM budget for tensor buffers, e.g. 2GiB", 2 * GiB)
    max_gpu_memory: int | str = _option(_size_or("auto"), "GPU-memory budget, e.g. 8GiB, or auto", "auto")
    max_shard_size: int | str = _option(
        _size_or("keep"), "keep the base's shard files, or re-shard to e.g. 5GB", "keep"
    )
    safe_merge: bool = _option(_bool, "refuse to write a merged tensor holding NaN or Inf", False)
    overwrite: bool = _option(_bool, "replace a non-empty output directory that holds something else", False)
    source: str | None = field(default=None, compare=False)  # the plan file, for messages


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[Any, str], Any]
    help: str

    @property
    def switch(self) -> bool:
        """A true/false option: a flag without a value on the command line."""
        return self.parse is _bool


OPTIONS = [Option(f.name, f.metadata["parse"], f.metadata["help"]) for f in fields(Plan) if "parse" in f.metadata]
OPTION_KEYS = {o.key for o in OPTIONS}
ADAPTER_KEYS = {"path", "weight", "peft_version"}


def _resolve_path(value: str, root: Path) -> str:
    if is_url(value):
        return value
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    candidate = root / path
    # A Hub repo id ("org/name", "org/name@rev") is kept as written when no such local path exists.
    if not candidate.exists() and looks_like_repo_id(value):
        return value
    return str(candidate.resolve())


def looks_like_repo_id(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?", value) is not None and not value.startswith(".")


def plan_from_dict(raw: Any, root: Path | None = None, source: str | None = None, **overrides: Any) -> Plan:
    """Validate a plan mapping (as read from YAML) plus overrides; every problem is one PlanError line."""
    where = f"{source}: " if source else ""
    if not isinstance(raw, dict):
        raise PlanError(f"{where}a plan must be a mapping of keys (base, adapters, output, ...)")
    root = root or Path.cwd()
    unknown = sorted(set(raw) - OPTION_KEYS - {"base", "adapters"})
    if unknown:
        known = ", ".join(["base", "adapters", *[o.key for o in OPTIONS]])
        raise PlanError(f"{where}unknown key {unknown[0]!r} (known keys: {known})")
    values: dict[str, Any] = {}
    for key in ("base", "adapters", "output"):
        if raw.get(key) is None and overrides.get(key) is None:
            raise PlanError(f"{where}missing required key {key!r}")
    values["base"] = _resolve_path(_str(raw["base"], f"{where}base"), root)
    values["adapters"] = tuple(_adapters(raw["adapters"], root, where))
    for option in OPTIONS:
        if overrides.get(option.key) is not None:
            values[option.key] = option.parse(overrides[option.key], f"--{option.key.replace('_', '-')}")
        elif raw.get(option.key) is not None:
            values[option.key] = option.parse(raw[option.key], f"{where}{option.key}")
    if is_url(values["output"]):
        pass
    elif overrides.get("output") is not None:
        values["output"] = str(Path(values["output"]).resolve())
    else:
        values["output"] = str((root / Path(os.path.expanduser(values["output"]))).resolve())
    return Plan(**values, source=source)


def _adapters(raw: Any, root: Path, where: str) -> list[AdapterSpec]:
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise PlanError(
            f"{where}adapters: expected a list of adapters (each a path, or a mapping with path and weight)"
        )
    specs = []
    for i, item in enumerate(raw):
        key = f"{where}adapters[{i}]"
        if isinstance(item, (str, os.PathLike)):
            item = {"path": item}
        if not isinstance(item, dict):
            raise PlanError(f"{key}: expected a path or a mapping with path and weight")
        unknown = sorted(set(item) - ADAPTER_KEYS)
        if unknown:
            raise PlanError(f"{key}: unknown key {unknown[0]!r} (known keys: path, weight, peft_version)")
        if "path" not in item:
            raise PlanError(f"{key}: missing required key 'path'")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not abs(weight) <= sys.float_info.max:
            raise PlanError(f"{key}.weight: expected a finite number, got {weight!r}")
        version = item.get("peft_version")
        if version is not None and not isinstance(version, str):
            raise PlanError(f"{key}.peft_version: expected a version string such as '0.21.2', got {version!r}")
        specs.append(AdapterSpec(_resolve_path(_str(item["path"], f"{key}.path"), root), float(weight), version))
    return specs


def load_plan(plan: "str | os.PathLike | dict | Plan", **overrides: Any) -> Plan:
    """A Plan from a YAML file path, a dict or a Plan, with overrides (None means not given) applied."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(plan, Plan):
        unknown = set(overrides) - OPTION_KEYS
        if unknown:
            raise PlanError(f"unknown override {sorted(unknown)[0]!r}")
        raw = {k: getattr(plan, k) for k in ("base", "output", *OPTION_KEYS)}
        raw["adapters"] = [{"path": a.path, "weight": a.weight, "peft_version": a.peft_version} for a in plan.adapters]
        return plan_from_dict(raw, Path.cwd(), plan.source, **overrides)
    if isinstance(plan, dict):
        return plan_from_dict(plan, Path.cwd(), None, **overrides)
    path = Path(plan)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: plan file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read plan file: {e}") from None
    import yaml

    try:
        raw = yaml.load(text, Loader=_unique_keys_loader(yaml))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PlanError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return plan_from_dict(raw, path.resolve().parent, str(path), **overrides)


def _unique_keys_loader(yaml):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML keeps the last value
    silently, and which of the two the user meant cannot be known."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    break  # the safe loader's own error names it ("found unhashable key")
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader
