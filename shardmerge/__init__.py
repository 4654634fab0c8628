"""shardmerge: merge PEFT LoRA adapters into sharded safetensors models, streaming, in a memory budget."""

__version__ = "0.1.0"

from .config import Plan, load_plan  # noqa: E402
from .errors import ShardmergeError  # noqa: E402


def merge(plan, **overrides):
    """Merge a plan (YAML path, dict or Plan) and return a MergeReport. Overrides replace plan keys."""
    from .runner import run

    return run(load_plan(plan, **overrides))


__all__ = ["merge", "load_plan", "Plan", "ShardmergeError", "__version__"]
