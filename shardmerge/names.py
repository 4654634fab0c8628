"""Adapter tensor names -> base checkpoint tensor names.

An adapter names tensors as the model's modules are named in memory; the base checkpoint names them as
they are stored. `BaseNames.require(name, ...)` returns the one base tensor an adapter name stands for, or
raises naming the adapter file and key.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import ShardmergeError
from .sources import BaseModel

# Output embeddings that transformers ties to the input embedding when tie_word_embeddings is set.
_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "output")
_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


class BaseNames:
    """Finds the base tensor an adapter names, tolerating a model-class prefix that differs between the
    checkpoint the adapter was trained on and the base (`model.` present in one and not the other)."""

    def __init__(self, base: BaseModel):
        self.base = base
        config = base.config
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.tied = bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))

    def find(self, name: str) -> str | None:
        tensors = self.base.tensors
        if name in tensors:
            return name
        candidates = [n for n in tensors if n.endswith("." + name) or name.endswith("." + n)]
        if len(candidates) > 1:
            raise ShardmergeError(f"{name!r} matches several base tensors ({', '.join(sorted(candidates)[:6])}); "
                                  "the adapter and base checkpoint layouts are ambiguous")
        if candidates:
            return candidates[0]
        return self._tied_embedding(name)

    def _tied_embedding(self, name: str) -> str | None:
        parts = name.split(".")
        if not self.tied or len(parts) < 2 or parts[-2] not in _OUTPUT_EMBEDDINGS or parts[-1] != "weight":
            return None
        inputs = [n for n in self.base.tensors if n.endswith(".weight") and n.split(".")[-2] in _INPUT_EMBEDDINGS]
        return inputs[0] if len(inputs) == 1 else None

    def require(self, name: str, adapter_file: Path, key: str) -> str:
        found = self.find(name)
        if found is None:
            close = difflib.get_close_matches(name, list(self.base.tensors), n=1)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise ShardmergeError(f"{adapter_file}: adapter tensor {key!r} targets {name!r}, which is not in the "
                                  f"base model {self.base.directory}{hint}")
        return found
