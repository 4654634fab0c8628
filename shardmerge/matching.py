"""Every adapter tensor matched to the base tensor it changes, as the Terms that change it: LoRA modules
(orientation by layer kind), trained biases, replaced tensors, trainable-token rows and expert parameters.
Shapes are checked here, against headers, so a mismatch is refused before a byte is written.
"""

from __future__ import annotations

from pathlib import Path

from . import experts
from .adapters import Adapter, LoraModule, module_scaling
from .errors import ShardmergeError
from .names import BaseNames
from .orientation import stores_in_out
from .safetensors_io import FLOAT_DTYPES, TensorInfo
from .sources import BaseModel, architecture
from .terms import BiasTerm, ExpertTerm, LoraTerm, RowsTerm
from .ties import Edits, Tie, find_alias


def collect(
    base: BaseModel, adapters: list[Adapter], names: BaseNames, ties: list[Tie], quantized: set[str] = frozenset()
) -> Edits:
    """Every adapter tensor matched to the base tensor it changes (or to a tied head the base does not store);
    `quantized` names the logical tensors of a quantized base's weights. One loop per kind of adapter content
    (replacements, LoRA modules, biases, token rows, expert parameters), kept together so the order of edits,
    which decides conflicts, reads in one place."""
    edits = Edits()
    token_rows: dict[str, list[tuple[str, set[int]]]] = {}

    def target(name: str, adapter_file: Path, key: str) -> tuple[str, TensorInfo]:
        alias = find_alias(ties, name)
        if alias is not None and not names.candidates(name)[0]:
            return alias[0], base.tensors[alias[1].matrix]
        found = names.require(name, adapter_file, key)
        return found, base.tensors[found]

    for adapter in adapters:
        weights_file = adapter.weights
        for target_name, tensor in adapter.replacements.items():
            if not names.candidates(target_name)[0]:
                _require_head(base, adapter, target_name, tensor)
            name, base_tensor = target(target_name, weights_file, tensor.name)
            if tensor.shape != base_tensor.shape:
                raise ShardmergeError(
                    f"{tensor.path}: {tensor.name!r} {list(tensor.shape)} cannot replace base "
                    f"tensor {name!r} {list(base_tensor.shape)} (resized vocabulary?)"
                )
            edits.replace(name, tensor, own=target_name in adapter.own_copies)
        for module in adapter.modules:
            name, base_tensor = target(module.module + ".weight", weights_file, module.a.name)
            term = _lora_term(module, adapter, base_tensor, base.config, name in quantized)
            edits.terms.setdefault(name, []).append(term)
            if module.b_bias is not None:
                bias_name, base_bias = target(module.module + ".bias", weights_file, module.b_bias.name)
                edits.terms.setdefault(bias_name, []).append(_bias_term(adapter, module, bias_name, base_bias))
        for name, term in _expert_terms(adapter, base, names, quantized):
            edits.terms.setdefault(name, []).append(term)
        for module_name, (indices, values) in adapter.token_rows.items():
            name, target_tensor = target(module_name + ".weight", weights_file, values.name)
            term = _rows_term(adapter, module_name, indices, values, name, target_tensor.shape, token_rows)
            edits.terms.setdefault(name, []).append(term)
    return edits


def _bias_term(adapter: Adapter, module: LoraModule, name: str, base_bias: TensorInfo) -> BiasTerm:
    """A trained lora_B bias, added to base bias `name` with the module's scaling."""
    if base_bias.shape != module.b_bias.shape:
        raise ShardmergeError(
            f"{module.b_bias.path}: {module.b_bias.name!r} does not fit base bias {name!r} {list(base_bias.shape)}"
        )
    return BiasTerm(module.b_bias, adapter.weight * module.scaling, f"{adapter.path}: {module.module}")


def _rows_term(
    adapter: Adapter, module_name: str, indices, values: TensorInfo, name: str, shape: tuple, trained: dict
) -> RowsTerm:
    """Trainable-token rows replacing rows of base tensor `name`. `trained` holds, per tensor, the rows earlier
    adapters replace: PEFT activates one trainable-tokens adapter per layer, so overlapping rows are refused."""
    if len(shape) != 2 or values.shape[1] != shape[1] or max(indices, default=0) >= shape[0]:
        raise ShardmergeError(
            f"{values.path}: {values.name!r} {list(values.shape)} with token ids up to "
            f"{max(indices, default=0)} does not fit base tensor {name!r} {list(shape)}"
        )
    for origin, rows in trained.get(name, []):
        if rows & set(indices):
            raise ShardmergeError(
                f"{values.path}: trainable token ids {sorted(rows & set(indices))[:8]} of "
                f"{name!r} are also trained by {origin}; PEFT cannot combine them: merge one"
            )
    trained.setdefault(name, []).append((adapter.path, set(indices)))
    return RowsTerm(indices, values, adapter.weight, f"{adapter.path}: {module_name}")


# Heads PEFT adds to modules_to_save for classification task types (utils.constants), and the class to load
# the base with so that it has one.
_CLASSIFIER_HEADS = ("score", "classifier")
_HEAD_CLASSES = {"TOKEN_CLS": "ForTokenClassification", "QUESTION_ANS": "ForQuestionAnswering"}


def _require_head(base: BaseModel, adapter: Adapter, target_name: str, tensor: TensorInfo) -> None:
    """A trained classification head the base lacks: the base was saved without it (as a causal LM)."""
    module = target_name.rpartition(".")[0]
    if module.split(".")[-1] not in _CLASSIFIER_HEADS:
        return
    model_class = architecture(base.config) or "the model"
    head_class = _HEAD_CLASSES.get(adapter.config.get("task_type"), "ForSequenceClassification")
    wanted = model_class.split("For")[0] + head_class
    labels = f"num_labels={tensor.shape[0]}" if tensor.shape else "num_labels"
    raise ShardmergeError(
        f"{adapter.weights}: the adapter trains the classification head {module!r}, which the base "
        f"{base.directory} ({model_class}) does not have; merge into the base saved as {wanted} "
        f"(from_pretrained(base, {labels}).save_pretrained(...))"
    )


def _lora_term(
    module: LoraModule, adapter: Adapter, target: TensorInfo, config: dict, quantized: bool = False
) -> LoraTerm:
    a, b, w = module.a.shape, module.b.shape, target.shape
    origin = f"{adapter.path}: {module.module}"
    mismatch = ShardmergeError(
        f"{origin}: lora_A {list(a)} / lora_B {list(b)} do not fit base tensor {target.name!r} {list(w)}"
    )
    if module.embedding:
        if len(w) != 2 or len(a) != 2 or len(b) != 2 or (a[1], b[0]) != w:
            raise mismatch
        transposed = True
    elif len(w) == 2 and len(a) == 2 and len(b) == 2:
        fits_normal, fits_transposed = w == (b[0], a[1]), w == (a[1], b[0])
        if not (fits_normal or fits_transposed):
            raise mismatch
        if fits_normal and fits_transposed:
            transposed = stores_in_out(config, target.name, adapter.fan_in_fan_out)
        else:
            transposed = fits_transposed
    elif len(w) >= 3 and len(a) == len(w) and len(b) == len(w):
        # Conv1d/2d/3d: A is (r, in, *k), B is (out, r, 1...); 1x1 and kxk both reduce to B @ A per output channel.
        if w[0] != b[0] or w[1:] != a[1:] or any(k != 1 for k in b[2:]):
            raise mismatch
        transposed = False
    else:
        raise mismatch
    if target.dtype not in FLOAT_DTYPES and not quantized:
        raise ShardmergeError(
            f"{origin}: base tensor {target.name!r} is {target.dtype}, neither a float tensor nor "
            "a weight of a quantized format named in config.json; cannot merge into it"
        )
    if module.magnitude is not None:
        norm_axis = w[1] if transposed else w[0]
        if module.magnitude.numel != norm_axis:
            raise ShardmergeError(
                f"{origin}: lora_magnitude_vector {list(module.magnitude.shape)} does not fit "
                f"base tensor {target.name!r} {list(w)}"
            )
    return LoraTerm(
        module.a, module.b, module.scaling, adapter.weight, transposed, module.magnitude, origin, module.singular
    )


def _expert_terms(adapter: Adapter, base: BaseModel, names: BaseNames, quantized: set[str]):
    """(base tensor name, ExpertTerm) for every expert parameter the adapter's target_parameters change;
    `quantized` names the logical tensors of a quantized base (their codec decodes them around the term)."""
    if not adapter.param_loras:
        return
    model, rules = experts.ModelFacts(base.config), experts.rules_for(base.config)
    layout = experts.lora_b_layout(adapter.config, adapter.weights.parent / "adapter_config.json")
    rule = experts.swap_rule(adapter.peft_version)
    targets = list(adapter.config.get("target_parameters") or [])
    owners: dict[str, list] = {}
    for lora in adapter.param_loras:
        owners.setdefault(lora.owner, []).append(lora)

    def find(name: str) -> TensorInfo | None:
        found = names.find(name)
        return None if found is None else base.tensors[found]

    for owner, loras in owners.items():
        plain = _plain_param_term(adapter, base, names, owner, loras, targets, quantized)
        if plain is not None:
            yield plain
            continue
        for param, lora in experts.assign_params(owner, loras, model.targeted(owner, targets, len(loras))).items():
            origin = f"{adapter.path}: {owner}.{param}"
            shape, parts = experts.checkpoint_slices(owner, param, None, rules, find)
            if not parts:
                raise ShardmergeError(
                    f"{adapter.weights}: adapter tensor {lora.a.name!r} targets {owner}.{param}, "
                    f"which is not in the base model {base.directory}, fused or per expert"
                )
            rank, scaling = module_scaling(adapter.config, f"{owner}.{param}")
            count, d1, d2 = shape
            if lora.a.shape[0] != rank * count or lora.b.shape[1] != rank * count:
                raise ShardmergeError(
                    f"{origin}: lora_A {list(lora.a.shape)} / lora_B {list(lora.b.shape)} do not "
                    f"hold r={rank} for each of the {count} experts"
                )
            transposed = lambda: model.is_transposed(owner)  # noqa: B023 - called within this iteration only
            swap = experts.swapped(lora.a.shape, lora.b.shape, d1, d2, rule, transposed, origin)
            stored = _stored_as(parts, shape)
            for name, part in parts:
                if base.tensors[name].dtype not in FLOAT_DTYPES and name not in quantized:
                    raise ShardmergeError(
                        f"{origin}: base tensor {name!r} is {base.tensors[name].dtype}, neither a float tensor "
                        "nor a weight of a quantized format named in config.json; cannot merge into it"
                    )
                a, b = experts.narrowed_reads(lora.a, lora.b, count, swap, part)
                yield name, ExpertTerm(a, b, count, swap, layout, part, scaling, adapter.weight, origin, stored)


def _plain_param_term(
    adapter: Adapter, base: BaseModel, names: BaseNames, owner: str, loras: list, targets: list, quantized: set[str]
):
    """(base tensor name, LoraTerm) for a ParamWrapper on a 2-D parameter (an MoE router's `gate.weight`, which
    PEFT's all-linear targets on Mixtral-style models), else None. PEFT merges it as a Linear: W + s * B @ A."""
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    stored = [(p, names.find(f"{owner}.{p}")) for p in experts.targeted_params(owner, leaves, targets)]
    stored = [(p, name) for p, name in stored if name is not None and len(base.tensors[name].shape) == 2]
    if len(stored) != 1 or len(loras) != 1:
        return None
    (param, name), lora = stored[0], loras[0]
    rank, scaling = module_scaling(adapter.config, f"{owner}.{param}")  # PEFT's pattern key: <module>.<param>
    if lora.a.shape[:1] != (rank,):
        raise ShardmergeError(f"{adapter.weights}: {lora.a.name!r} {list(lora.a.shape)} does not have r={rank} rows")
    module = LoraModule(owner, lora.a, lora.b, scaling=scaling, rank=rank)
    return name, _lora_term(module, adapter, base.tensors[name], base.config, name in quantized)


def _stored_as(parts: list, shape: tuple) -> str:
    """How the base stores an expert parameter, for the dry run."""
    first_name, first = parts[0]
    if first.count > 1:
        return (
            f"fused {first_name} {list(shape)}"
            + (" transposed" if first.transposed else "")
            + (" gate/up interleaved" if first.interleaved else "")
        )
    leaves = list(dict.fromkeys(name.removesuffix(".weight").rpartition(".")[2] for name, _ in parts))
    module = first_name.removesuffix(".weight").rpartition(".")[0].rpartition(".")[0]  # drop ".<expert>.<leaf>"
    leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
    return f"{len(parts)} per-expert 2-D tensors {module}.*.{leaf}.weight"
