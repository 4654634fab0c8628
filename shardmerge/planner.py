"""From a Plan and the inputs' headers to a MergePlan: which base tensor each adapter tensor changes,
how, in what tiles, and where every output byte goes. No tensor data is read here (but see ties.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import experts
from .adapters import Adapter, LoraModule, load_adapter, module_scaling
from .config import Plan
from .errors import ShardmergeError
from .formats import Quantized, detect
from .names import BaseNames
from .safetensors_io import DTYPE_SIZES, FLOAT_DTYPES, TensorInfo, encode_header, read_header
from .sources import (
    INDEX_NAME,
    BaseModel,
    architecture,
    convert_legacy_adapter,
    find_adapter,
    input_identity,
    read_base,
)
from .stores import location, store_for
from .terms import BiasTerm, ExpertTerm, LoraTerm, RowsTerm, Term
from .ties import Edits, Tie, find_tie, settle
from .units import FLOAT32_BYTES, IO_BUFFER, KiB, MiB, format_size

FORMAT_VERSION = 2  # bump when the same plan would produce different bytes (2: headers padded to the base's length)
_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Architectures whose linear layers are transformers' Conv1D, stored (in, out).
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
# What a run holds besides its planned buffers, measured as peak RSS above an idle `import torch, shardmerge`
# for a merge of tiny tensors: modules imported on first use (yaml, xxhash), five stage threads (stacks and
# glibc arenas), allocator slack, and the plan of a model of up to PLAN_TENSORS tensors (405B dense has ~1.1k).
# Each tensor beyond that adds its headers, TensorInfo and TensorTask objects (~1.2 KiB measured; MoE models
# have ~100k tensors, so this is real memory).
RUNTIME_BYTES = 8 * MiB
PLAN_TENSORS = 1024
PER_TENSOR_BYTES = 2 * KiB
# Delta survival is a diagnostic, and its exact sums cost as much as the merge itself (a float32 copy of the
# base, the rounded result widened back, two differences, two norms). A tensor larger than SURVIVAL_EXACT_ELEMS
# has them taken on a fixed sample of its rows instead: runs of about SURVIVAL_RUN_ELEMS elements, one run in
# every SURVIVAL_STRIDE, placed by row number so that the sample (and the number reported) does not depend on
# the tiling, the budget or the device. Contiguous runs keep the sums to a few large operations per chunk
# rather than many small strided ones. A term that changes only some rows (trainable tokens) is summed whole.
SURVIVAL_EXACT_ELEMS = 1024 * 1024
SURVIVAL_RUN_ELEMS = 64 * 1024
SURVIVAL_STRIDE = 16


@dataclass
class Companion:
    """A scale tensor a requantized weight rewrites: written with the weight's last tile."""

    source: TensorInfo
    out_offset: int = 0


@dataclass
class TensorTask:
    name: str
    source: TensorInfo  # the base tensor, or the adapter tensor replacing it (quantized: the logical tensor)
    out_dtype: str
    out_offset: int = 0  # absolute, in the output shard
    terms: list[Term] = field(default_factory=list)  # applied in order
    rows_per_tile: int = 0
    chunk_rows: int = 0
    quant: Quantized | None = None  # the source is quantized: tiles are dequantized as they are read
    requant: bool = False  # written back in the source's format, with `companions` (its fresh scales)
    companions: list[Companion] = field(default_factory=list)
    tiled: tuple[bool, ...] = ()  # per quant scale: its rows follow the row blocks, so it is read and written per tile

    @property
    def out_nbytes(self) -> int:
        if self.requant:
            return self.quant.codes.nbytes
        return self.source.numel * DTYPE_SIZES[self.out_dtype]

    @property
    def total_nbytes(self) -> int:
        return self.out_nbytes + sum(c.source.nbytes for c in self.companions)

    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """Its tensors in the output header: (name, dtype, shape, nbytes)."""
        shape = self.quant.codes.shape if self.requant else self.source.shape
        return [(self.name, self.out_dtype, shape, self.out_nbytes)] + [
            (c.source.name, c.source.dtype, c.source.shape, c.source.nbytes) for c in self.companions
        ]

    @property
    def is_copy(self) -> bool:
        return not self.terms and self.quant is None and self.source.dtype == self.out_dtype

    @property
    def column_norms(self) -> bool:
        """Whether some term needs a pass over all rows before the merge (DoRA on a transposed kind)."""
        return any(t.column_norms for t in self.terms)

    @property
    def rows(self) -> int:
        """Rows a tile is cut from: along dim 0, or along (expert, d1) for a stack of experts."""
        shape = self.source.shape
        return math.prod(shape[: max((t.row_dims for t in self.terms), default=1)]) if shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as read; `out_row_bytes` as written."""
        return self.source.nbytes // self.rows if self.rows else self.source.nbytes

    @property
    def out_row_bytes(self) -> int:
        return self.out_nbytes // self.rows if self.rows else self.out_nbytes

    @property
    def survival_rows(self) -> tuple[int, int]:
        """(run, period): delta survival is summed over the rows r with r % period < run (all of a small tensor)."""
        if self.source.numel <= SURVIVAL_EXACT_ELEMS or not all(t.every_row for t in self.terms):
            return 1, 1
        run = max(1, SURVIVAL_RUN_ELEMS // _row_elems(self))
        return run, run * SURVIVAL_STRIDE

    @property
    def needs_amax(self) -> bool:
        """Requantizing with one scale for the tensor needs the merged tensor's maximum first."""
        return self.requant and self.quant.codec.needs_amax(self.quant)

    @property
    def prepass(self) -> bool:
        return self.column_norms or self.needs_amax

    @property
    def quant_group(self) -> int:
        """Tile rows per row of a quantized source's codec: a codec counts rows along dim 0 of the logical
        tensor, and a stack of experts merged along (expert, d1) has d1 tile rows per expert."""
        return self.rows // self.source.shape[0] if self.quant is not None and self.source.shape else 1

    @property
    def row_unit(self) -> int:
        """Tiles and chunks start on multiples of this many rows: whole scale blocks (for MXFP4, whose scales
        run along the stored transpose, whole experts)."""
        return self.quant.codec.row_block(self.quant) * self.quant_group if self.quant is not None else 1

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The rows of every tiled scale that tile rows r0:r1 (r0 on a row unit) decode with: one per row unit."""
        return r0 // self.row_unit, -(-r1 // self.row_unit)

    @property
    def tiled_scale_row_bytes(self) -> int:
        """Bytes of one row of every tiled scale together (a row per row unit of the task)."""
        return sum(s.row_bytes for s, tiled in zip(self.quant.scales, self.tiled) if tiled) if self.quant else 0

    def tile_layout(self, r0: int, r1: int) -> list[tuple[int, TensorInfo, int]]:
        """Where a tile's rows of the tiled scales sit in its slab, after its data (as read or as written, the
        longer), each aligned for its dtype: (index in quant.scales, those rows, slab offset). The merge
        requantizes them in place, and the writer writes them back from there."""
        b0, b1 = self.scale_rows(r0, r1)
        offset = _aligned((r1 - r0) * max(self.row_bytes, self.out_row_bytes))
        layout = []
        for i, (scale, tiled) in enumerate(zip(self.quant.scales if self.quant else (), self.tiled)):
            if tiled:
                layout.append((i, scale.rows(b0, b1), offset))
                offset = _aligned(offset + (b1 - b0) * scale.row_bytes)
        return layout

    def tile_bytes(self, rows: int) -> int:
        """Slab bytes a tile of `rows` rows (from a row unit) takes: its data and its tiled scales' rows."""
        layout = self.tile_layout(0, rows)
        if not layout:
            return rows * max(self.row_bytes, self.out_row_bytes)
        return layout[-1][2] + layout[-1][1].nbytes


@dataclass
class OutputShard:
    name: str
    tasks: list[TensorTask]
    header: bytes = b""
    size: int = 0


@dataclass
class MergePlan:
    plan: Plan
    base: BaseModel
    adapters: list[Adapter]
    shards: list[OutputShard]
    write_index: bool
    device: str
    fingerprint: str = ""
    buffers: Buffers | None = None
    config: dict | None = None  # config.json to write instead of the base's (PEFT untied the embeddings)
    inputs: dict[str, dict] = field(default_factory=dict)  # output shard -> {input file: identity} it is made from
    quant_label: str = ""  # the base's quantized format, if any
    dropped_files: set[str] = field(default_factory=set)  # base files that would describe what is no longer so

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.total_nbytes for s in self.shards for t in s.tasks)

    def index(self) -> dict:
        weight_map = {e[0]: s.name for s in self.shards for t in s.tasks for e in t.entries()}
        metadata = {k: v for k, v in self.base.index_metadata.items() if k != "total_size"}
        return {"metadata": {**metadata, "total_size": self.total_tensor_bytes}, "weight_map": weight_map}


def _stores_in_out(config: dict, tensor: str, fan_in_fan_out: bool) -> bool:
    """Whether a square 2-D weight is stored (in, out), as transformers' Conv1D stores it. Decided by the
    (sub-)model the tensor belongs to, not by squareness: a composite model (VisionEncoderDecoder,
    EncoderDecoder) nests each sub-model's config under the name its modules live under (`decoder.`); a
    known architecture decides; remote code or an unknown model_type leaves it to the adapter's
    fan_in_fan_out (which PEFT sets true itself when it finds a Conv1D)."""
    sub = config
    for part in tensor.split(".")[:-1]:
        nested = sub.get(part)
        if isinstance(nested, dict) and "model_type" in nested:
            sub = nested
    model_type = sub.get("model_type")
    if model_type in _CONV1D_MODEL_TYPES:
        return True
    if not model_type or config.get("auto_map") or sub.get("auto_map") or not _known_model_type(model_type):
        return fan_in_fan_out
    return False


def _known_model_type(model_type: str) -> bool:
    """Whether transformers (when installed) builds this model_type itself; without it, the config is trusted."""
    known = _transformers_model_types()
    return known is None or model_type in known


@functools.cache
def _transformers_model_types() -> frozenset[str] | None:
    """The model types transformers has a config class for (None: it is not installed). transformers 5 keeps
    them in a data-only module, read here by path: importing the package would add ~35 MiB to a process that
    max_memory bounds, and seconds to its start."""
    if "transformers" not in sys.modules:
        spec = importlib.util.find_spec("transformers")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0], "models", "auto", "auto_mappings.py")
        if path.is_file():
            loader = importlib.util.spec_from_file_location("_shardmerge_auto_mappings", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return frozenset(module.CONFIG_MAPPING_NAMES)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # older releases: no data module

    return frozenset(CONFIG_MAPPING_NAMES)


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
            transposed = _stores_in_out(config, target.name, adapter.fan_in_fan_out)
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


def _shard_inputs(shards: list[OutputShard], adapters: list[Adapter]) -> dict[str, dict[str, dict]]:
    """For each output shard, the identity of every input file it is made from (for a converted legacy
    adapter, of the .bin it came from), so that a resume can tell whether a finished shard is still current."""
    originals = {a.weights: a.original for a in adapters}
    identities: dict = {}
    out = {}
    for shard in shards:
        paths = {t.source.path for t in shard.tasks} | {
            x.path for t in shard.tasks for term in t.terms for x in term.reads()
        }
        files = sorted({originals.get(p, p) for p in paths}, key=str)
        out[shard.name] = {str(p): identities.setdefault(p, input_identity(p)) for p in files}
    return out


def _collect(
    base: BaseModel, adapters: list[Adapter], names: BaseNames, tie: Tie | None, quantized: set[str] = frozenset()
) -> Edits:
    """Every adapter tensor matched to the base tensor it changes (or to a tied head the base does not store);
    `quantized` names the logical tensors of a quantized base's weights. One loop per kind of adapter content
    (replacements, LoRA modules, biases, token rows, expert parameters), kept together so the order of edits,
    which decides conflicts, reads in one place."""
    edits = Edits()
    token_rows: dict[str, list[tuple[str, set[int]]]] = {}

    def target(name: str, adapter_file: Path, key: str) -> tuple[str, TensorInfo]:
        if tie is not None and not tie.stored and tie.names_output(name) and not names.candidates(name)[0]:
            return tie.output, base.tensors[tie.input]
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
                if base_bias.shape != module.b_bias.shape:
                    raise ShardmergeError(
                        f"{module.b_bias.path}: {module.b_bias.name!r} does not fit base bias "
                        f"{bias_name!r} {list(base_bias.shape)}"
                    )
                edits.terms.setdefault(bias_name, []).append(
                    BiasTerm(module.b_bias, adapter.weight * module.scaling, f"{adapter.path}: {module.module}")
                )
        for name, term in _expert_terms(adapter, base, names, quantized):
            edits.terms.setdefault(name, []).append(term)
        for module_name, (indices, values) in adapter.token_rows.items():
            name, target_tensor = target(module_name + ".weight", weights_file, values.name)
            shape = target_tensor.shape
            if len(shape) != 2 or values.shape[1] != shape[1] or max(indices, default=0) >= shape[0]:
                raise ShardmergeError(
                    f"{values.path}: {values.name!r} {list(values.shape)} with token ids up to "
                    f"{max(indices, default=0)} does not fit base tensor {name!r} {list(shape)}"
                )
            for origin, rows in token_rows.get(name, []):  # PEFT activates one trainable-tokens adapter per layer
                if rows & set(indices):
                    raise ShardmergeError(
                        f"{values.path}: trainable token ids {sorted(rows & set(indices))[:8]} of "
                        f"{name!r} are also trained by {origin}; PEFT cannot combine them: merge one"
                    )
            token_rows.setdefault(name, []).append((adapter.path, set(indices)))
            edits.terms.setdefault(name, []).append(
                RowsTerm(indices, values, adapter.weight, f"{adapter.path}: {module_name}")
            )
    return edits


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


def _with_added(tensors: dict[str, TensorInfo], added: dict[str, list[str]]):
    """A shard's tensors in order, each followed by the new output tensors (an untied head, the embeddings tied
    to it) that copy it."""
    for name, tensor in tensors.items():
        yield name, tensor
        for new in added.get(name, ()):
            yield new, tensor


def build_plan(plan: Plan, scratch: Path, device: str = "cpu", budget: int | None = None) -> MergePlan:
    """Read headers and configs, match every adapter tensor, lay out and tile the output. `budget` is the
    bytes tiles may fill (cuda.tile_budget: on CUDA also bounded by GPU memory); default max_memory. It is
    the plan's recipe, step by step (inputs, codec, matching, ties, layout, headers, tiling, fingerprint), so it
    stays one function."""
    base = read_base(plan.base)
    codec = detect(base.config, base.directory)
    quantized = codec.weights(base.tensors) if codec else {}
    view = _logical_view(base, quantized)
    by_name = {q.name: q for q in quantized.values()}
    adapters = _read_adapters(plan, scratch)
    tie = find_tie(view)
    edits = _collect(view, adapters, BaseNames(view), tie, set(by_name))
    settle(tie, edits, view)
    clash = sorted(set(edits.replaced) & set(by_name)) if plan.dtype == "keep" else []
    if clash:
        replacement = edits.replaced[clash[0]]
        raise ShardmergeError(
            f"{replacement.path}: {replacement.name!r} replaces {clash[0]!r}, a {codec.label} "
            "weight; replacing a quantized weight needs a float output (dtype: bfloat16)"
        )

    def task(name: str, tensor: TensorInfo) -> TensorTask:
        out_dtype = tensor.dtype
        if plan.dtype != "keep" and tensor.dtype in FLOAT_DTYPES:
            out_dtype = _OUT_DTYPES[plan.dtype]
        return TensorTask(name, edits.replaced.get(name, tensor), out_dtype, terms=edits.terms.get(name, []))

    added: dict[str, list[str]] = {}  # a head that was tied (and its aliases): beside its embedding
    for name, after in edits.added:
        added.setdefault(after, []).append(name)
    layout = [
        (shard.path.name, _shard_tasks(_with_added(shard.tensors, added), quantized, edits, plan.dtype, task))
        for shard in base.shards
    ]
    if plan.max_shard_size != "keep":
        layout = _reshard([t for _, tasks in layout for t in tasks], plan.max_shard_size)
    shards = [OutputShard(name, tasks) for name, tasks in layout]
    base_shards = {shard.path.name: shard for shard in base.shards}
    for shard in shards:
        meta = base_shards.get(shard.name, base.shards[0]).metadata
        # A kept layout keeps the base's data start, so copied tensors stay block-aligned with their source
        # and an extent-sharing filesystem shares their blocks instead of copying them.
        like = base_shards[shard.name].data_start if plan.max_shard_size == "keep" else None
        entries = [e for t in shard.tasks for e in t.entries()]
        shard.header, offsets = encode_header(entries, meta, like)
        offsets = iter(offsets)
        for t in shard.tasks:
            t.out_offset = next(offsets)
            for c in t.companions:
                c.out_offset = next(offsets)
        shard.size = len(shard.header) + sum(t.total_nbytes for t in shard.tasks)
    write_index = base.has_index or len(shards) > 1
    config = edits.config
    if codec is not None and plan.dtype != "keep":  # a plain float checkpoint now: nothing may say otherwise
        config = {k: v for k, v in (config or base.config).items() if k != "quantization_config"}
        config["dtype"] = plan.dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = plan.dtype
    merge_plan = MergePlan(
        plan, base, adapters, shards, write_index, device, config=config, inputs=_shard_inputs(shards, adapters)
    )
    if codec is not None:
        merge_plan.quant_label = codec.label
        if plan.dtype != "keep":
            merge_plan.dropped_files = set(codec.extra_files)
    merge_plan.buffers = _tile(merge_plan, plan.max_memory if budget is None else budget)
    merge_plan.fingerprint = fingerprint(merge_plan)
    return merge_plan


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


def _shard_tasks(tensors, quantized: dict[str, Quantized], edits, dtype: str, plain) -> list[TensorTask]:
    """One shard's tasks from its (name, tensor) pairs. A quantized weight that is merged, or any when
    dequantizing, becomes one task on its logical tensor; its scales travel with it (rewritten when requantized,
    dropped when dequantized), and so do passengers such as input_scale when dequantizing. Everything else is
    `plain(name, tensor)`."""
    owner = {t.name: q for q in quantized.values() for t in q.scales + q.passengers}
    tasks = []
    for name, tensor in tensors:
        q = quantized.get(name) or owner.get(name)
        converted = q is not None and (dtype != "keep" or q.name in edits.terms)
        if q is None or not converted:
            tasks.append(plain(name, tensor))
        elif name in quantized:
            tasks.append(_quant_task(q, edits.terms.get(q.name, []), edits.replaced.get(q.name), dtype))
        elif dtype == "keep" and tensor in q.passengers:
            tasks.append(plain(name, tensor))  # input_scale and the like describe activations: a merge leaves them
    return tasks


def _quant_task(q: Quantized, terms: list, replacement: TensorInfo | None, dtype: str) -> TensorTask:
    if replacement is not None:  # a float output (checked when planning), so no format is kept
        return TensorTask(q.name, replacement, _OUT_DTYPES[dtype], terms=terms)
    tiled = q.codec.tiled_scales(q)
    if dtype == "keep":
        return TensorTask(
            q.codes.name,
            q.logical,
            q.codes.dtype,
            terms=terms,
            quant=q,
            requant=True,
            companions=[Companion(s) for s in q.scales],
            tiled=tiled,
        )
    return TensorTask(q.name, q.logical, _OUT_DTYPES[dtype], terms=terms, quant=q, tiled=tiled)


def _reshard(tasks: list[TensorTask], max_bytes: int) -> list[tuple[str, list[TensorTask]]]:
    groups: list[list[TensorTask]] = [[]]
    size = 0
    for t in tasks:
        if groups[-1] and size + t.out_nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.out_nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def scratch_bytes(budget: int) -> int:
    """The fixed buffer size for fallback copies and checksum reads, taken from what the budget leaves for buffers."""
    return min(IO_BUFFER, budget // 16)


def fixed_cost(task: TensorTask) -> int:
    """Bytes held for a whole task: every term's factors, and a quantized source's whole (untiled) scales as
    stored, twice when requantized (the fresh ones), plus float32 for decoding them. Tiled scales travel with
    their tiles (_row_cost)."""
    total = sum(t.fixed_bytes for t in task.terms)
    if task.quant is not None:
        scales = [s for s, tiled in zip(task.quant.scales, task.tiled) if not tiled]
        total += (2 if task.requant else 1) * sum(s.nbytes for s in scales) + 4 * sum(s.numel for s in scales)
    return total


def _row_cost(task: TensorTask, itemsize: int) -> int:
    """Slab elements one row of a tile takes: its own, and in the same units its share of the tiled scales'
    rows its slab carries (TensorTask.tile_layout)."""
    return _row_elems(task) + math.ceil(task.tiled_scale_row_bytes / (task.row_unit * itemsize))


def _aligned(offset: int) -> int:
    return -(-offset // _SLAB_ALIGN) * _SLAB_ALIGN


@dataclass(frozen=True)
class Buffers:
    """Every host buffer the executor may hold, fixed before it starts, so that max_memory is a bound.

    `slabs` tile buffers of `slab_bytes` circulate reader -> merger -> writer (a tile's output is written
    back into its own slab); the merger owns one float32 scratch of `work_elems` (one chunk on the CPU, a
    whole tile on the GPU; times `work_factor` for the temporaries of DoRA, delta survival and codecs); two
    tasks' factors may be alive at once; and
    two `scratch` shares cover the fallback copy buffer (made only if the kernel copy fails) and the
    checksum's mmap window. `total` counts all of that and the run's fixed overhead, so it bounds the
    process's peak RSS above an idle `import torch, shardmerge`."""

    slabs: int
    slab_bytes: int
    work_elems: int
    work_factor: int
    factor_bytes: int
    scratch: int

    overhead: int  # the run's fixed cost outside these buffers (RUNTIME_BYTES and the plan's objects)
    shared_bytes: int = 0  # adapter tensors kept loaded across tasks (Term.shared_reads: an expert parameter's lora_B)

    @property
    def total(self) -> int:
        return (
            self.slabs * self.slab_bytes
            + FLOAT32_BYTES * self.work_elems * self.work_factor
            + self.factor_bytes
            + 2 * self.scratch
            + self.overhead
            + self.shared_bytes
        )


SLABS = 4  # one being read, one merging, one being written, one spare for jitter
_SLAB_ALIGN = 16  # a tile's scale rows start on this within its slab, so they view as their dtype
# The CPU merge walks a tile in chunks of about 1 MiB of float32, so that widening, the low-rank update
# and rounding all happen while the chunk is in cache: memory traffic drops from ~20 to ~4 bytes per weight.
CHUNK_ELEMS = 256 * 1024


def _row_elems(task: TensorTask) -> int:
    return task.source.numel // task.rows if task.rows else max(task.source.numel, 1)


# Float32 chunk-sized temporaries: delta survival keeps the base and the rounded result beside the merge;
# decoding and encoding a quantized chunk (unpacked codes, scales per element, absolute values) takes four.
_SURVIVAL_WORK = 2
_CODEC_WORK = 4


def _tile(merge_plan: MergePlan, budget: int) -> Buffers:
    """Choose rows per tile (and per cache-sized chunk) for every tensor that is not a plain copy, and
    the buffers that implies. The budget arithmetic is one piece: each reservation below feeds the next, and
    tests/test_budget.py checks the whole against max_memory."""
    tensors = sum(len(s.tasks) for s in merge_plan.shards)
    reserved = store_for(location(merge_plan.plan.output)).write_memory()  # the output store's part buffers
    overhead = RUNTIME_BYTES + PER_TENSOR_BYTES * max(0, tensors - PLAN_TENSORS) + reserved
    if merge_plan.plan.max_memory <= overhead:
        parts = f", {format_size(reserved)} of upload part buffers" if reserved else ""
        raise ShardmergeError(
            f"max_memory {format_size(merge_plan.plan.max_memory)} is too small: a run of this "
            f"model holds {format_size(overhead)} before any buffer (threads, the plan of {tensors} "
            "tensors, allocator"
            f"{parts}); set max_memory to at least {format_size(overhead + MiB)}"
        )
    budget = min(budget, merge_plan.plan.max_memory - overhead)  # what the buffers below may use on the host
    scratch = scratch_bytes(budget)
    tasks = [t for s in merge_plan.shards for t in s.tasks if not t.is_copy and t.out_nbytes > 0]
    if not tasks:
        return Buffers(0, 0, 0, 1, 0, scratch, overhead)
    itemsize = max(max(DTYPE_SIZES[t.source.dtype], DTYPE_SIZES[t.out_dtype]) for t in tasks)
    work_factor = max((x.work_copies for t in tasks for x in t.terms), default=1)
    work_factor += _SURVIVAL_WORK + (_CODEC_WORK if any(t.quant is not None for t in tasks) else 0)
    on_cuda = merge_plan.device.startswith("cuda")
    shared = _shared_bytes(tasks, (budget - 2 * scratch) // 4)
    factors = 2 * max(fixed_cost(t) for t in tasks) + shared  # the cache is held like factors, whole run long
    # A tiny budget shrinks the chunk too (then a chunk is a whole tile).
    per_chunk_elem = SLABS * itemsize + FLOAT32_BYTES * work_factor
    chunk_elems = max(1, min(CHUNK_ELEMS, (budget - factors - 2 * scratch) // per_chunk_elem))
    for t in tasks:
        rows, unit = t.rows, t.row_unit
        chunk = max(unit, chunk_elems // _row_elems(t))
        t.chunk_rows = rows if on_cuda else min(rows, chunk - chunk % unit)
    # On the CPU the float32 scratch is one chunk; on CUDA it lives on the device, outside max_memory.
    work_elems = 0 if on_cuda else max(t.chunk_rows * _row_elems(t) for t in tasks)
    fixed = factors + 2 * scratch + FLOAT32_BYTES * work_elems * work_factor
    # A slab's tiled scale rows round up to whole rows and aligned starts: at most one row and one alignment each.
    fixed += SLABS * max(
        (t.tiled_scale_row_bytes + _SLAB_ALIGN * (len(t.tiled) + 1) for t in tasks if any(t.tiled)), default=0
    )
    per_elem = SLABS * itemsize
    elems = (budget - fixed) // per_elem
    for t in tasks:
        rows, unit, row = t.rows, t.row_unit, _row_cost(t, itemsize)
        block = min(rows, unit) * row
        if block > elems:
            need = overhead + fixed + block * per_elem
            what = "one row block" if unit == 1 else f"one block of {unit} rows (its scale grid)"
            raise ShardmergeError(
                f"max_memory {format_size(merge_plan.plan.max_memory)} is too small for tensor {t.name!r}: {what} "
                f"needs {format_size(need)} in all; raise max_memory to at least "
                f"{format_size(int(need * 1.1) + MiB)}"
            )
        t.rows_per_tile = max(1, min(rows, elems // row))
        if t.rows_per_tile < rows:
            t.rows_per_tile = max(unit, t.rows_per_tile - t.rows_per_tile % unit)
        if t.rows_per_tile > t.chunk_rows:
            # Whole chunks per tile: the same chunks, so the same bytes, whatever the budget.
            t.rows_per_tile -= t.rows_per_tile % t.chunk_rows
        else:
            t.chunk_rows = t.rows_per_tile
        if t.column_norms and t.needs_amax:
            raise ShardmergeError(
                f"{t.name}: DoRA on a transposed layer into a per-tensor-scaled quantized weight "
                "needs two pre-passes, which shardmerge does not do; use dtype: bfloat16"
            )
    tile_elems = max(t.rows_per_tile * _row_elems(t) for t in tasks)
    slab = max(t.tile_bytes(t.rows_per_tile) for t in tasks)
    return Buffers(
        SLABS, slab, tile_elems if on_cuda else work_elems, work_factor, factors - shared, scratch, overhead, shared
    )


def _shared_bytes(tasks: list[TensorTask], room: int) -> int:
    """Room for the adapter tensors several tasks read (an expert parameter's lora_B, read again for each of its
    per-expert tensors): enough for every such tensor of one module (a layer's gate, up and down slices come
    interleaved in name order), within a quarter of the buffers' budget; 0 where none fits."""
    by_module: dict[str, dict] = {}
    for t in tasks:
        for term in t.terms:
            for info in term.shared_reads():
                by_module.setdefault(term.origin.rpartition(".")[0], {})[info] = FLOAT32_BYTES * info.numel
    need = max((sum(sizes.values()) for sizes in by_module.values()), default=0)
    return need if need <= room else 0


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
