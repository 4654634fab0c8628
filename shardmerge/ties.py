"""Tied input and output embeddings (tie_word_embeddings) and what PEFT's merge does to them.

transformers 5 shares one matrix between the input embedding and the output head when the config ties them
and the checkpoint stores one of the two, or both with equal values; both stored with different values stay
apart, with a warning (PreTrainedModel.tie_weights). On the shared matrix PEFT's merge adds a LoRA delta on
either module to both. A `modules_to_save` entry on either gives that module its own copy
(ModulesToSaveWrapper), so after the merge the two no longer share storage: PEFT then sets
tie_word_embeddings=False (BaseTuner._unload_and_optionally_merge) and the saved model stores both. With
`ensure_weight_tying` PEFT ties the copies too, and the pair stays shared.

The planner reads no tensor data, with one exception here: whether two stored aliases are equal decides
whether transformers ties them, so it is read, in chunks, only when an adapter touches one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ShardmergeError
from .safetensors_io import TensorInfo
from .sources import BaseModel, architecture
from .stores import store_for

# Output embeddings that transformers ties to the input embedding, and the input embedding names.
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "output")
_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared", "embeddings")
# Encoder-decoder models (T5, BART, Marian, ...) tie the head and both stacks' embed_tokens to `shared`: the
# matrix the others alias, whichever of those aliases the checkpoint stores as well. transformers ties the
# stacks' embeddings only while tie_word_embeddings holds, so an untied output must store them.
_SHARED = "shared"
_STACKS = ("encoder", "decoder")
# The head's name when the checkpoint does not store it: transformers 5's causal and conditional-generation
# models declare their tied head as lm_head.weight (_tied_weights_keys), GPT-NeoX's former embed_out included.
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
    input: str  # the input embedding's weight as the checkpoint stores it
    output: str  # the head's weight: as stored, or the name transformers saves it under once untied
    stored: bool  # the checkpoint stores the head as well (with equal values: one matrix for transformers)
    aliases: tuple[str, ...] = ()  # other names tied to the input that the checkpoint does not store

    def names_output(self, name: str) -> bool:
        """Whether an adapter's name for a tensor the base does not store stands for the tied head."""
        parts = name.split(".")
        return len(parts) >= 2 and parts[-2] in OUTPUT_EMBEDDINGS and parts[-1] == "weight"


def find_tie(base: BaseModel) -> Tie | None:
    """The pair transformers shares for this checkpoint, before any adapter; None when nothing is shared.
    With both stored, sharing also needs equal values, which `settle` checks only if an adapter touches one."""
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
    aliases = ()
    if inputs[0].split(".")[-2] == _SHARED and base.config.get("is_encoder_decoder"):
        prefix = inputs[0].removesuffix(f"{_SHARED}.weight")
        aliases = tuple(n for n in (f"{prefix}{s}.embed_tokens.weight" for s in _STACKS) if n not in base.tensors)
    if heads:  # with no tie_word_embeddings in the config we cannot know the class default: treat as untied
        return Tie(inputs[0], heads[0], True, aliases) if ties else None
    # Only the embedding is stored: the model loads only if the head is tied to it, whatever the config says;
    # unless its class has no head (a classifier, a bare encoder), where nothing shares the embedding.
    model_class = architecture(base.config)
    if model_class.endswith(_HEADLESS) and not model_class.endswith(_HEAD_CLASSES) and not aliases:
        return None
    return Tie(inputs[0], _HEAD, False, aliases)


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


def settle(tie: Tie | None, edits: Edits, base: BaseModel) -> None:
    """Turn edits on the tied pair into edits on the output tensors, as PEFT's merge and save lay them out."""
    if tie is None or not (set(edits.terms) | set(edits.replaced)) & {tie.input, tie.output}:
        return
    shared = not tie.stored or tensors_equal(base.tensors[tie.input], base.tensors[tie.output])
    if not shared:  # two matrices for transformers and PEFT: each keeps its own edits; PEFT notes the untie
        _untie(tie, edits, base)
        return
    if not edits.own & {tie.input, tie.output}:
        _share(tie, edits)
        return
    _untie(tie, edits, base)
    if not tie.stored:
        model_class = architecture(base.config) or "unknown"
        if not model_class.endswith(_HEAD_CLASSES):
            raise ShardmergeError(
                f"{base.directory}: the adapter unties the embedding {tie.input!r} from the head of "
                f"a {model_class} model, whose head name is not known here; merge it with PEFT"
            )
        edits.added.append((tie.output, tie.input))


def _untie(tie: Tie, edits: Edits, base: BaseModel) -> None:
    """tie_word_embeddings false, and the aliases transformers then no longer ties written out. They keep the
    original matrix, as in PEFT's merged model: the input's edits, or the head's when the input got its own
    modules_to_save copy (the aliases never do), or the base values when both did."""
    edits.config = untied_config(base.config)
    keeps = next((n for n in (tie.input, tie.output) if n not in edits.own), None)
    for alias in tie.aliases:
        edits.added.append((alias, tie.input))
        if keeps in edits.terms:
            edits.terms[alias] = list(edits.terms[keeps])
        if keeps in edits.replaced:
            edits.replaced[alias] = edits.replaced[keeps]


def _share(tie: Tie, edits: Edits) -> None:
    """One matrix: every delta on either module lands on it, and both stored names get the same result."""
    terms = edits.terms.pop(tie.input, []) + edits.terms.pop(tie.output, [])
    head = edits.replaced.pop(tie.output, None)
    if head is not None:
        edits.replace(tie.input, head, own=False)
    if terms:
        edits.terms[tie.input] = terms
    if tie.stored:
        if terms:
            edits.terms[tie.output] = list(terms)
        if tie.input in edits.replaced:
            edits.replaced[tie.output] = edits.replaced[tie.input]


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
