"""Facts about a model class read from transformers' source files, without importing transformers.

A merging process must not import transformers (~35 MiB that max_memory does not budget for, and seconds of
start-up), and users need not have it at all. What the planner needs from it is declarative: the data-only
auto mappings (model_type -> module, config and model class names) and class attributes such as
`_tied_weights_keys`. They are read here with `ast`, never executed (only auto_mappings.py, which holds
literals alone, is run). Anything this reader cannot follow exactly (a value computed at run time, a
condition on something other than the config, remote code) makes the answer None: the caller then uses its
own offline rules, as it does when transformers is not installed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

# Parameter names. transformers expands other keys as regexes over the built model's parameter names
# (get_expanded_tied_weights_keys), which only the built model can do; a plain name expands to itself.
_PLAIN_KEYS = re.compile(r"[A-Za-z0-9_.]+\.(weight|bias)")
# Auto classes a model builds sub-models with, and the mapping that picks the class for a sub-config.
_AUTO_MAPPINGS = {"AutoModel": "MODEL_MAPPING_NAMES", "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}
_MISSING = object()


class Unknown(Exception):
    """The source does something this reader does not follow."""


def package_root() -> Path | None:
    """The installed transformers package directory (None: not installed), found without importing it."""
    module = sys.modules.get("transformers")
    if module is not None and getattr(module, "__file__", None):
        return Path(module.__file__).parent
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


@functools.cache
def auto_mappings() -> ModuleType | None:
    """transformers 5's data-only models/auto/auto_mappings.py (CONFIG_MAPPING_NAMES, ...), run by path;
    None when transformers is absent or older (no such module)."""
    root = package_root()
    path = root / "models" / "auto" / "auto_mappings.py" if root else None
    if path is None or not path.is_file():
        return None
    loader = importlib.util.spec_from_file_location("_shardmerge_auto_mappings", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def tied_weights(config: dict, architecture: str) -> dict[str, str] | None:
    """transformers' tied parameters (target -> source, module names of the whole model) for `architecture`
    built from `config`, as post_init's all_tied_weights_keys holds them: each PreTrainedModel's
    `_tied_weights_keys` where its own config ties, its sub-models' under their attribute names. None when
    that cannot be read from the source exactly."""
    return _tied_weights(json.dumps(config, sort_keys=True), architecture)


@functools.lru_cache(maxsize=16)
def _tied_weights(config_json: str, architecture: str) -> dict[str, str] | None:
    """tied_weights, once per config (a run plans more than once). The mapping is shared: do not change it."""
    config = json.loads(config_json)
    model_type = config.get("model_type")
    if package_root() is None or auto_mappings() is None or not isinstance(model_type, str):
        return None
    if config.get("auto_map"):  # remote code: its classes, not transformers' of the same name
        return None
    try:
        found = _find_class(_modeling_file(model_type), architecture)
        return None if found is None else _model_ties(found, _ConfigView(config))
    except (Unknown, OSError, SyntaxError, RecursionError):
        return None
    finally:
        _source.cache_clear()


def kept_in_float32(model_type: str, architecture: str, dtype: str) -> tuple[str, ...] | None:
    """The parameter patterns transformers keeps in float32 when it loads `architecture` in `dtype`
    (PreTrainedModel._get_dtype_plan: `_keep_in_fp32_modules_strict` for float16 and bfloat16,
    `_keep_in_fp32_modules` for float16 too), which save_pretrained then writes as float32; each matches a
    parameter name by regex search. The class and its bases are read; None when the source does not say."""
    attrs = {"bfloat16": ("_keep_in_fp32_modules_strict",), "float16": ("_keep_in_fp32_modules_strict",
             "_keep_in_fp32_modules")}.get(dtype, ())  # fmt: skip
    if package_root() is None or auto_mappings() is None:
        return None
    try:
        found = _find_class(_modeling_file(model_type), architecture)
        if found is None:
            return None
        chain, _ = _chain(found)
        return tuple(p for attr in attrs for p in _literal_names(_class_value(chain, attr)))
    except (Unknown, OSError, SyntaxError, RecursionError):
        return None
    finally:
        _source.cache_clear()


def _literal_names(node) -> list[str]:
    if node is _MISSING:
        return []
    value = ast.literal_eval(node)  # a list/set of names or None, as every model declares it
    if value is None:
        return []
    if not isinstance(value, (list, set, tuple)) or not all(isinstance(v, str) for v in value):
        raise Unknown("a computed _keep_in_fp32_modules")
    return sorted(value)


# ---- files and classes


def _module_dir(model_type: str) -> Path:
    """models/<module> for a model_type (configuration_auto.model_type_to_module_name), deprecated ones too."""
    special = getattr(auto_mappings(), "SPECIAL_MODEL_TYPE_TO_MODULE_NAME", {})
    name = special.get(model_type, model_type.replace("-", "_"))
    models = package_root() / "models"
    return models / name if (models / name).is_dir() else models / "deprecated" / name


def _modeling_file(model_type: str) -> Path:
    directory = _module_dir(model_type)
    return directory / f"modeling_{directory.name}.py"


def _configuration_file(model_type: str) -> Path:
    directory = _module_dir(model_type)
    return directory / f"configuration_{directory.name}.py"


# A line at the left margin that is not a comment or a closing bracket starts the next top-level statement.
_NEXT_STATEMENT = re.compile(r"^[^\s#)\]}]", re.M)


@functools.lru_cache(maxsize=8)
def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _statement(path: Path, head: str) -> ast.stmt | None:
    """The first top-level statement of `path` whose first line matches `head`, parsed on its own."""
    match = re.search(head, _source(path), re.M)
    return _parse_at(path, match.start()) if match else None


def _parse_at(path: Path, start: int) -> ast.stmt:
    """The top-level statement starting at offset `start`, parsed alone: a whole modeling file's syntax tree
    (~7 MiB) would stay in the memory of a merging process that max_memory bounds. A block cut short (a
    string running along the margin) does not parse, and is then not known."""
    text = _source(path)
    line_end = text.find("\n", start)
    end = _NEXT_STATEMENT.search(text, line_end + 1) if line_end >= 0 else None
    return ast.parse(text[start : end.start() if end else len(text)], str(path)).body[0]


def _find_class(path: Path, name: str, depth: int = 0) -> tuple[Path, ast.ClassDef] | None:
    """The class `name` defined in `path`, or in the model module it is imported from (a relative import).
    Only models/ is read: the base classes outside it (PreTrainedModel, PreTrainedConfig, their mixins) are
    the machinery whose rule this module follows, not model facts."""
    if depth > 4 or not path.is_file() or not path.is_relative_to(package_root() / "models"):
        return None
    node = _statement(path, rf"^class {re.escape(name)}\b")
    if isinstance(node, ast.ClassDef):
        return path, node
    for match in re.finditer(r"^from \.", _source(path), re.M):
        node = _parse_at(path, match.start())
        for alias in node.names if isinstance(node, ast.ImportFrom) and node.module else ():
            if (alias.asname or alias.name) == name:
                module = path.parents[node.level - 1].joinpath(*node.module.split(".")).with_suffix(".py")
                return _find_class(module, alias.name, depth + 1)
    return None


def _chain(found: tuple[Path, ast.ClassDef]) -> tuple[list[tuple[Path, ast.ClassDef]], bool]:
    """The class and its bases transformers defines (depth first, as the MRO of these single-inheritance
    chains), and whether it is a PreTrainedModel."""
    chain, pretrained, todo = [], False, [found]
    while todo:
        path, node = todo.pop(0)
        chain.append((path, node))
        bases = []
        for base in node.bases:
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            pretrained |= name == "PreTrainedModel"
            resolved = _find_class(path, name) if name else None
            if resolved is not None and resolved[1] is not node:
                bases.append(resolved)
        todo = bases + todo
    return chain, pretrained


def _class_value(chain, attr: str):
    """The value node of the first class-level assignment of `attr` along the chain (_MISSING: none).
    A method or property of that name is computed at run time."""
    for _, node in chain:
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == attr:
                raise Unknown(attr)
            if attr in _assigned_names(stmt):
                return stmt.value
    return _MISSING


def _assigned_names(stmt: ast.stmt) -> list[str]:
    """The names a class-body statement assigns a value to (`x = ...`, `x: T = ...`)."""
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
        return [stmt.target.id]
    return []


def _methods(chain, name: str) -> list[tuple[Path, ast.FunctionDef]]:
    """Every definition of method `name` along the chain, bases first (the order super().__init__ runs them)."""
    return [
        (p, s) for p, node in reversed(chain) for s in node.body if isinstance(s, ast.FunctionDef) and s.name == name
    ]


# ---- configs and the little code around them


class _ConfigView:
    """A config as the model's code sees it: config.json's values, else the config class's declared literal
    defaults; tie_word_embeddings as its __post_init__ leaves it. Sub-configs (text_config, ...) are views too."""

    def __init__(self, values: dict):
        self.values = values
        self.defaults: dict | None = None
        self.tie = None  # tie_word_embeddings after the config class's own code ran

    def get(self, key: str):
        if key != "tie_word_embeddings" and key in self.values:
            value = self.values[key]
            return _ConfigView(value) if isinstance(value, dict) else value
        if self.defaults is None:
            _load_defaults(self)
        if key == "tie_word_embeddings":
            return self.tie
        if key not in self.defaults:
            raise Unknown(f"config attribute {key!r}")
        return self.defaults[key]

    def ties(self) -> bool:
        """getattr(config, "tie_word_embeddings", False), as get_expanded_tied_weights_keys reads it."""
        return bool(self.get("tie_word_embeddings"))


class _UnknownView(_ConfigView):
    """A config this reader could not follow to; fine as long as nothing is asked of it."""

    def __init__(self):
        super().__init__({})

    def get(self, key: str):
        raise Unknown(f"config attribute {key!r} of a sub-model")


def _load_defaults(view: _ConfigView) -> None:
    """The config class's declared literal field defaults, then its __post_init__/__init__ assignments to
    tie_word_embeddings followed in order (T5 forces it true; LLaVA takes the text config's)."""
    model_type = view.values.get("model_type")
    names = getattr(auto_mappings(), "CONFIG_MAPPING_NAMES", {})
    if not isinstance(model_type, str) or model_type not in names:
        raise Unknown(f"config class of {model_type!r}")
    found = _find_class(_configuration_file(model_type), names[model_type])
    if found is None:
        raise Unknown(names[model_type])
    chain, _ = _chain(found)
    view.defaults = {}
    for _, node in reversed(chain):
        for stmt in node.body:
            for name in _assigned_names(stmt):
                try:
                    view.defaults[name] = ast.literal_eval(stmt.value)
                except (ValueError, TypeError):  # TypeError: a literal that cannot be built ({[1]: 2})
                    view.defaults.pop(name, None)  # computed: not known here
    view.tie = view.values.get("tie_word_embeddings", view.defaults.get("tie_word_embeddings"))
    for _, method in _methods(chain, "__post_init__") + _methods(chain, "__init__"):
        _run_config_code(method.body, view)


def _run_config_code(body: list[ast.stmt], view: _ConfigView) -> None:
    for stmt in body:
        if not _mentions(stmt, "tie_word_embeddings", assigned=True):
            continue
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and _is_self_attr(stmt.targets[0], "tie_word_embeddings")
        ):
            view.tie = _evaluate(stmt.value, view)
        elif isinstance(stmt, ast.If):
            _run_config_code(stmt.body if _evaluate(stmt.test, view) else stmt.orelse, view)
        else:
            raise Unknown("tie_word_embeddings set by code")


def _evaluate(node: ast.expr, view: _ConfigView, local: dict | None = None):
    """A condition or value over the config: literals, `config.x` / `self.x` / `self.config.x` (sub-config
    attributes too), a local holding a literal (an __init__ argument left at its default), getattr with a
    default, not/and/or, and comparisons."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and isinstance((local or {}).get(node.id), ast.Constant):
        return local[node.id].value
    if isinstance(node, ast.Name) and node.id in ("config", "self"):
        return view
    if isinstance(node, ast.Attribute):
        owner = _evaluate(node.value, view, local)
        if not isinstance(owner, _ConfigView):
            raise Unknown(ast.unparse(node))
        return owner if node.attr == "config" and owner is view else owner.get(node.attr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, view, local)
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, view, local) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right, op = _evaluate(node.left, view, local), _evaluate(node.comparators[0], view, local), node.ops[0]
        compare = {ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.Eq: lambda a, b: a == b,
                   ast.NotEq: lambda a, b: a != b}.get(type(op))  # fmt: skip
        if compare is not None:
            return compare(left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
        if len(node.args) == 3 and isinstance(node.args[1], ast.Constant):
            owner = _evaluate(node.args[0], view, local)
            try:
                return owner.get(node.args[1].value)
            except Unknown:
                return _evaluate(node.args[2], view, local)
    raise Unknown(ast.unparse(node))


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _mentions(node: ast.AST, attr: str, assigned: bool = False) -> bool:
    """Whether `self.<attr>` occurs in the statement (only as an assignment target, with `assigned`)."""
    for sub in ast.walk(node):
        if _is_self_attr(sub, attr) and (not assigned or isinstance(sub.ctx, ast.Store)):
            return True
    return False


# ---- models


def _model_ties(found: tuple[Path, ast.ClassDef], view: _ConfigView, depth: int = 0) -> dict[str, str]:
    """all_tied_weights_keys of the class built from `view`, as its post_init collects them: its own mapping
    if its config ties, then each sub-model's under the sub-model's attribute name."""
    chain, _ = _chain(found)
    if depth > 6 or _methods(chain, "tie_weights") or _methods(chain, "get_expanded_tied_weights_keys"):
        raise Unknown(f"{found[1].name} ties its own way")
    for _, node in chain:  # only __init__ is followed (Zamba2 fills the mapping in a layer builder)
        methods = (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name != "__init__")
        if any(_mentions(method, "_tied_weights_keys") for method in methods):
            raise Unknown(f"{node.name} computes its tied weights")
    own = _mapping(_class_value(chain, "_tied_weights_keys"))
    children: dict[str, tuple] = {}
    for path, method in _methods(chain, "__init__"):
        own = _run_init(method.body, path, view, own, children, _defaults(method))
    keys = {}
    if own and view.ties():
        if not all(_PLAIN_KEYS.fullmatch(k) for k in own.keys() | set(own.values())):
            raise Unknown("tied weights given as patterns")
        keys = dict(own)
    for attr, (child, child_view) in children.items():
        sub = _model_ties(child, child_view, depth + 1)
        keys.update({f"{attr}.{k}": f"{attr}.{v}" for k, v in sub.items()})
    return keys


def _defaults(method: ast.FunctionDef) -> dict[str, ast.expr]:
    """An __init__'s arguments other than the config, at their literal defaults: from_pretrained and from_config
    build a model from its config alone (EncoderDecoderModel's `encoder=None` then builds its own)."""
    args = method.args
    pairs = [
        *zip(args.args[len(args.args) - len(args.defaults) :], args.defaults),
        *zip(args.kwonlyargs, args.kw_defaults),
    ]
    return {arg.arg: value for arg, value in pairs if isinstance(value, ast.Constant) and arg.arg != "config"}


def _mapping(node) -> dict | None:
    if node is _MISSING:
        return None
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError):
        raise Unknown("_tied_weights_keys computed") from None
    if value is not None and not (
        isinstance(value, dict) and all(isinstance(x, str) for x in [*value, *value.values()])
    ):
        raise Unknown("_tied_weights_keys is not a mapping of names")
    return value


def _run_init(body, path: Path, view: _ConfigView, own, children: dict, local: dict):
    """Follows a model's __init__ for what decides its ties: assignments to self._tied_weights_keys (under
    conditions on the config) and the sub-models it builds (self.<attr> = <PreTrainedModel class>(config...)).
    Returns the class's mapping as the body leaves it; fills `children` with attr -> (class, config view)."""
    for stmt in body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if _is_self_attr(target, "_tied_weights_keys"):
                own = _mapping(stmt.value)
                continue
            if isinstance(target, ast.Name):
                local[target.id] = stmt.value
            elif isinstance(target, ast.Attribute) and _is_self_attr(target, target.attr):
                child = _sub_model(stmt.value, path, view, local)
                if child is not None:
                    children[target.attr] = child
                    continue
        if isinstance(stmt, ast.If) and (_mentions(stmt, "_tied_weights_keys") or _builds_model(stmt, path)):
            branch = stmt.body if _evaluate(stmt.test, view, local) else stmt.orelse
            own = _run_init(branch, path, view, own, children, local)
        elif _mentions(stmt, "_tied_weights_keys"):
            raise Unknown("_tied_weights_keys changed by code")
    return own


def _sub_model(value: ast.expr, path: Path, view: _ConfigView, local: dict):
    """(class, config view) when `value` builds a PreTrainedModel: a class of the modeling code called with a
    config, or AutoModel/AutoModelForCausalLM.from_config(a sub-config); None for any other module."""
    if isinstance(value, ast.Name) and value.id in local:  # base_model = FSMTModel(config); self.model = base_model
        value = local[value.id]
    if not isinstance(value, ast.Call) or not value.args:
        return None
    func = value.func
    if isinstance(func, ast.Attribute) and func.attr == "from_config" and isinstance(func.value, ast.Name):
        if not func.value.id.startswith("Auto"):
            return None
        mapping = _AUTO_MAPPINGS.get(func.value.id)
        sub = _arg_view(value.args[0], view, local)
        names = _auto_model_names(mapping) if mapping else None
        model_type = sub.values.get("model_type")
        if names is None or model_type not in names:
            raise Unknown(f"{func.value.id} of {model_type!r}")
        found = _find_class(_modeling_file(model_type), names[model_type])
        if found is None:
            raise Unknown(names[model_type])
        return found, sub
    if not isinstance(func, ast.Name):
        return None
    found = _find_class(path, func.id)
    if found is None or not _chain(found)[1]:
        return None
    try:
        sub = _arg_view(value.args[0], view, local)
    except Unknown:
        sub = _UnknownView()
    return found, sub


def _builds_model(stmt: ast.stmt, path: Path) -> bool:
    for sub in ast.walk(stmt):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name):
            found = _find_class(path, sub.func.id)
            if found is not None and _chain(found)[1]:
                return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "from_config":
            return True
    return False


def _arg_view(node: ast.expr, view: _ConfigView, local: dict, depth: int = 0) -> _ConfigView:
    """The config a sub-model is built with: `config`, `self.config`, a sub-config attribute, a local copy."""
    if depth > 8:
        raise Unknown("config argument")
    if isinstance(node, ast.Name) and node.id in local:
        return _arg_view(local[node.id], view, local, depth + 1)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("copy.deepcopy", "deepcopy") and node.args:
        return _arg_view(node.args[0], view, local, depth + 1)
    found = _evaluate(node, view)
    if not isinstance(found, _ConfigView):
        raise Unknown("config argument")
    return found


@functools.cache
def _auto_model_names(mapping: str) -> dict | None:
    """A model_type -> class name mapping of models/auto/modeling_auto.py, read as the literal it is."""
    node = _statement(package_root() / "models" / "auto" / "modeling_auto.py", rf"^{mapping} = ")
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args:
        try:
            return dict(ast.literal_eval(node.value.args[0]))
        except (ValueError, TypeError):
            return None
    return None
