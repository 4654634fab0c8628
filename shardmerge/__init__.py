"""shardmerge: merge PEFT LoRA adapters into sharded safetensors models, streaming, in a memory budget."""

from ._version import __version__
from .config import Plan, load_plan
from .distributed import Topology
from .errors import ShardmergeError


def merge(plan, *, topology: Topology | None = None, progress: bool = False, **overrides):
    """Merge a plan (YAML path, dict or Plan) and return a MergeReport; prints nothing unless `progress`.
    Overrides replace plan keys. `topology` is this process's rank in a multi-process merge (for one read
    from a launcher's environment: shardmerge.distributed.topology()); by default a single process."""
    from .runner import run

    return run(load_plan(plan, **overrides), topology=topology, progress=progress)


__all__ = ["merge", "load_plan", "Plan", "ShardmergeError", "Topology", "__version__"]
