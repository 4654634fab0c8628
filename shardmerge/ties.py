"""Tied weights: which stored tensors transformers loads as one matrix, and what PEFT's merge does to them.

transformers 5 ties the parameters a model class lists in `_tied_weights_keys` (target -> source; its
sub-models' lists under their attribute names), for each (sub-)model whose config says tie_word_embeddings
(PreTrainedModel.get_expanded_tied_weights_keys / post_init). At load (tie_weights with the missing keys)
a group sharing one source becomes one matrix: the source if stored, else the first stored target; a target
stored too joins it when equal and stays apart, with a warning, when not. modelsource.tied_weights reads that
list from transformers' source without importing it; without transformers, or for a class it cannot read,
the name rules below stand in (an input embedding, a head named lm_head/embed_out/output, T5/BART's stacks).

On a shared matrix PEFT's merge adds a LoRA delta on any of its modules to all of them. A `modules_to_save`
entry gives that module its own copy (ModulesToSaveWrapper), so after the merge the group no longer shares
storage: PEFT then sets tie_word_embeddings=False (BaseTuner._unload_and_optionally_merge), which unties every
group on the next load, so every member is written under its own name. With `ensure_weight_tying` PEFT ties
the copies too, and the group stays shared.

The planner reads no tensor data, with one exception here: whether two stored members are equal decides
whether transformers ties them, so it is read, in chunks, only when an adapter touches one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ShardmergeError
from .modelsource import tied_weights
from .names import BaseNames
from .safetensors_io import TensorInfo
from .sources import BaseModel, architecture
from .stores import store_for

# ---- the offline name rules (transformers absent, or a class its source does not tell about)
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "output")
_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared", "embeddings")
# Encoder-decoder models (T5, BART, ...) tie the head and both stacks' embed_tokens to `shared`.
_SHARED = "shared"
_STACKS = ("encoder", "decoder")
# The head's name when the checkpoint does not store it: transformers 5's causal and conditional-generation
# models declare their tied head as lm_head.weight, GPT-NeoX's former embed_out included.
_HEAD = "lm_head.weight"
_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Classes with no output embedding at all (get_output_embeddings() is None): nothing is tied to the embedding.
_HEADLESS = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "Model",
)
_CHUNK = 8 * 2**20


def config_ties(config: dict) -> bool | None:
    """tie_word_embeddings where the config holds it (top level, else the text sub-config); None if absent."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = config.get("tie_word_embeddings", text_config.get("tie_word_embeddings"))
    return None if value is None else bool(value)


def untied_config(config: dict) -> dict:
    """config.json as PEFT saves it after the merge untied the pair: tie_word_embeddings false wherever the
    config holds it (the text sub-config of a composite model included), at the top level if nowhere."""
    out = dict(config)
    placed = False
    for key, value in config.items():
        if isinstance(value, dict) and "tie_word_embeddings" in value:
            out[key] = {**value, "tie_word_embeddings": False}
            placed = True
    if "tie_word_embeddings" in config or not placed:
        out["tie_word_embeddings"] = False
    return out


@dataclass(frozen=True)
class Tie:
    """One matrix transformers shares between several parameters of the loaded model."""

    matrix: str  # the stored tensor the group loads as
    peers: tuple[str, ...] = ()  # stored too: one matrix with `matrix` while equal to it, apart otherwise
    # (output name, module name) of the members the checkpoint does not store; the name rules' guessed head
    # has no module name: any output-embedding name stands for it
    aliases: tuple[tuple[str, str | None], ...] = ()
    guessed: str = ""  # name rules only: the model class whose head name lm_head.weight is guessed (no untying)

    @property
    def members(self) -> tuple[str, ...]:
        return (self.matrix, *self.peers, *(out for out, _ in self.aliases))

    def alias_for(self, name: str) -> str | None:
        """The alias an adapter's (module) name stands for, a model-class prefix apart; None if none."""
        parts = name.split(".")
        for out, module in self.aliases:
            if module is None:
                hit = len(parts) >= 2 and parts[-2] in OUTPUT_EMBEDDINGS and parts[-1] == "weight"
            else:
                hit = name == module or module.endswith("." + name) or name.endswith("." + module)
            if hit:
                return out
        return None


def find_ties(base: BaseModel, names: BaseNames) -> list[Tie]:
    """The groups transformers shares for this checkpoint, before any adapter. With peers stored, sharing
    also needs equal values, which `settle` checks only if an adapter touches the group."""
    model_class = architecture(base.config)
    rule = tied_weights(base.config, model_class) if model_class else None
    if rule is None:
        tie = _named_tie(base)
        return [tie] if tie is not None else []
    groups: dict[str, list[str]] = {}
    for target, source in rule.items():
        groups.setdefault(source, [source]).append(target)
    ties = []
    for members in groups.values():
        stored = {m: names.find(m) for m in members}
        present = [m for m in members if stored[m]]
        if not present:  # transformers warns the checkpoint is corrupt; an adapter on it is refused by name
            continue
        first = present[0]  # the source, else the first stored target (tie_weights swaps them)
        aliases = tuple((_stored_name(m, first, stored[first]), m) for m in members if not stored[m])
        ties.append(Tie(stored[first], tuple(stored[m] for m in present[1:]), aliases))
    return ties


def _stored_name(module: str, like_module: str, like_stored: str) -> str:
    """The checkpoint name for module `module`, stored the way `like_module` is (as `like_stored`): a
    checkpoint of the base model alone lacks the head class's prefix, which transformers adds at load."""
    if like_module.endswith("." + like_stored):
        prefix = like_module[: -len(like_stored)]
        return module.removeprefix(prefix)
    if like_stored.endswith("." + like_module):
        return like_stored[: -len(like_module)] + module
    return module


def find_alias(ties: list[Tie], name: str) -> tuple[str, Tie] | None:
    """(alias, its tie) when an adapter's name stands for a tied member the checkpoint does not store."""
    for tie in ties:
        alias = tie.alias_for(name)
        if alias is not None:
            return alias, tie
    return None


def _named_tie(base: BaseModel) -> Tie | None:
    """The name rules: one input embedding, tied to a head of equal shape, or to lm_head.weight when no head
    is stored (the model loads only if it is tied), and to both stacks' embed_tokens when it is `shared`."""
    ties = config_ties(base.config)
    inputs = [n for n in base.tensors if n.endswith(".weight") and n.split(".")[-2] in _INPUT_EMBEDDINGS]
    inputs = [n for n in inputs if n.split(".")[-2] == _SHARED] or inputs
    if len(inputs) != 1 or ties is False:
        return None
    heads = [
        n
        for n in base.tensors
        if n.endswith(".weight")
        and n.split(".")[-2] in OUTPUT_EMBEDDINGS
        and base.tensors[n].shape == base.tensors[inputs[0]].shape
    ]
    if len(heads) > 1:
        return None
    stacks = ()
    if inputs[0].split(".")[-2] == _SHARED and base.config.get("is_encoder_decoder"):
        prefix = inputs[0].removesuffix(f"{_SHARED}.weight")
        names = (f"{prefix}{s}.embed_tokens.weight" for s in _STACKS)
        stacks = tuple((n, n) for n in names if n not in base.tensors)
    if heads:  # with no tie_word_embeddings in the config we cannot know the class default: treat as untied
        return Tie(inputs[0], (heads[0],), stacks) if ties else None
    model_class = architecture(base.config)
    if model_class.endswith(_HEADLESS) and not model_class.endswith(_HEAD_CLASSES) and not stacks:
        return None
    guessed = "" if model_class.endswith(_HEAD_CLASSES) else model_class or "unknown"
    return Tie(inputs[0], (), ((_HEAD, None), *stacks), guessed)


@dataclass
class Edits:
    """What the adapters do to each target, keyed by the base tensor name (or a tied head not stored)."""

    terms: dict[str, list] = field(default_factory=dict)
    replaced: dict[str, TensorInfo] = field(default_factory=dict)
    own: set[str] = field(default_factory=set)  # replaced by a modules_to_save copy of their own
    added: list[tuple[str, str]] = field(default_factory=list)  # (new output tensor, stored tensor it follows)
    config: dict | None = None  # config.json to write instead of the base's

    def replace(self, name: str, tensor: TensorInfo, own: bool) -> None:
        """Two different replacements of one tensor are an error; the same values twice are one replacement."""
        if name in self.replaced and not tensors_equal(self.replaced[name], tensor):
            first = self.replaced[name]
            raise ShardmergeError(
                f"{tensor.path}: {tensor.name!r} and {first.path}: {first.name!r} both replace "
                f"{name!r} with different values; PEFT cannot activate both either: merge one"
            )
        self.replaced[name] = tensor
        if own:
            self.own.add(name)


def settle(ties: list[Tie], edits: Edits, base: BaseModel) -> None:
    """Turn edits on tied members into edits on the output tensors, as PEFT's merge and save lay them out:
    a group every adapter edit leaves shared stays one matrix (each stored member gets the same result); one
    a modules_to_save copy splits, or whose stored members differ, unties the model."""
    touched = set(edits.terms) | set(edits.replaced)
    groups = {tie: _shared_members(tie, base) for tie in ties if touched & set(tie.members)}
    untie = any(edits.own & set(shared) or len(shared) < len(tie.members) for tie, shared in groups.items())
    if untie:
        edits.config = untied_config(base.config)
    for tie in ties:
        shared = groups.get(tie, tie.members)
        if tie in groups:
            _share(shared, edits)
        if untie:
            if tie.guessed:
                raise ShardmergeError(
                    f"{base.directory}: the adapter unties the embedding {tie.matrix!r} from the head of a "
                    f"{tie.guessed} model, whose head name is not known here; merge it with PEFT"
                )
            edits.added += [(out, tie.matrix) for out, _ in tie.aliases]
        else:
            for out, _ in tie.aliases:  # not written: the matrix holds their edits
                edits.terms.pop(out, None)
                edits.replaced.pop(out, None)


def _shared_members(tie: Tie, base: BaseModel) -> tuple[str, ...]:
    """The members transformers loads as the one matrix: stored peers only while equal to it."""
    peers = tuple(p for p in tie.peers if tensors_equal(base.tensors[tie.matrix], base.tensors[p]))
    return (tie.matrix, *peers, *(out for out, _ in tie.aliases))


def _share(members: tuple[str, ...], edits: Edits) -> None:
    """One matrix for the members without a modules_to_save copy of their own: every delta on any of them
    lands on it, and so does a replacement that is not a copy (a saved base layer); each of them gets the
    result. A member with its own copy keeps its own edits."""
    rest = [m for m in members if m not in edits.own]
    terms = [term for m in rest for term in edits.terms.pop(m, [])]
    replaced = [edits.replaced.pop(m) for m in rest if m in edits.replaced]
    for m in rest:
        for tensor in replaced:
            edits.replace(m, tensor, own=False)
        if terms:
            edits.terms[m] = list(terms)


def tensors_equal(a: TensorInfo, b: TensorInfo) -> bool:
    """torch.equal on the stored values, as transformers compares tied aliases, read a chunk at a time."""
    import torch

    from .mergemath import TORCH_DTYPES

    if a.shape != b.shape:
        return False
    if (a.path, a.offset, a.dtype) == (b.path, b.offset, b.dtype):
        return True
    rows = a.shape[0] if a.shape else 1
    step = max(1, _CHUNK // max(a.row_bytes, b.row_bytes, 1))
    with store_for(a.path).open(a.path) as ra, store_for(b.path).open(b.path) as rb:
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            chunks = []
            for reader, info in ((ra, a), (rb, b)):
                raw = bytearray(n * info.row_bytes)
                reader.read_into(raw, info.offset + r0 * info.row_bytes)
                chunks.append(torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]) if raw else torch.empty(0))
            x, y = chunks
            if x.dtype != y.dtype:
                x, y = x.double(), y.double()
            if not torch.equal(x, y):
                return False
    return True
