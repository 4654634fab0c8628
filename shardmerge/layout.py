"""Where every output byte goes: which output shard holds each task, in what order, at which offset, under
which header. A kept layout is the base's files and tensor order (a head that was tied follows its embedding);
otherwise tensors are cut into new shards of at most max_shard_size.
"""

from __future__ import annotations

from .adapters import Adapter
from .formats import Quantized
from .mergeplan import Companion, OutputShard, TensorTask
from .safetensors_io import FLOAT_DTYPES, TensorInfo, encode_header
from .sources import BaseModel, input_identity
from .ties import Edits

_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def lay_out(
    base: BaseModel,
    quantized: dict[str, Quantized],
    edits: Edits,
    dtype: str,
    max_shard_size: int | str,
    float32: set[str] = frozenset(),
) -> list[OutputShard]:
    """The output shards with every task and header placed. `quantized` maps a quantized base's weights to
    their logical tensors; `dtype` and `max_shard_size` are the plan's; `float32` names the float tensors a
    cast keeps in float32."""

    def plain(name: str, tensor: TensorInfo) -> TensorTask:
        out_dtype = tensor.dtype
        if dtype != "keep" and tensor.dtype in FLOAT_DTYPES:
            out_dtype = "F32" if name in float32 else _OUT_DTYPES[dtype]
        return TensorTask(name, edits.replaced.get(name, tensor), out_dtype, terms=edits.terms.get(name, []))

    added: dict[str, list[str]] = {}  # a head that was tied (and its aliases): beside its embedding
    for name, after in edits.added:
        added.setdefault(after, []).append(name)
    layout = [
        (shard.path.name, _shard_tasks(_with_added(shard.tensors, added), quantized, edits, dtype, plain))
        for shard in base.shards
    ]
    if max_shard_size != "keep":
        layout = _reshard([t for _, tasks in layout for t in tasks], max_shard_size)
    shards = [OutputShard(name, tasks) for name, tasks in layout]
    base_shards = {shard.path.name: shard for shard in base.shards}
    for shard in shards:
        meta = base_shards.get(shard.name, base.shards[0]).metadata
        # A kept layout keeps the base's data start, so copied tensors stay block-aligned with their source
        # and an extent-sharing filesystem shares their blocks instead of copying them.
        like = base_shards[shard.name].data_start if max_shard_size == "keep" else None
        entries = [e for t in shard.tasks for e in t.entries()]
        shard.header, offsets = encode_header(entries, meta, like)
        offsets = iter(offsets)
        for t in shard.tasks:
            t.out_offset = next(offsets)
            for c in t.companions:
                c.out_offset = next(offsets)
        shard.size = len(shard.header) + sum(t.total_nbytes for t in shard.tasks)
    return shards


def _with_added(tensors: dict[str, TensorInfo], added: dict[str, list[str]]):
    """A shard's tensors in order, each followed by the new output tensors (an untied head, the embeddings tied
    to it) that copy it."""
    for name, tensor in tensors.items():
        yield name, tensor
        for new in added.get(name, ()):
            yield new, tensor


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


def shard_inputs(shards: list[OutputShard], adapters: list[Adapter]) -> dict[str, dict[str, dict]]:
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
