"""Running one merge across processes and nodes with torch.distributed.

Ranks come from the launcher's environment (torchrun and accelerate set RANK/WORLD_SIZE/LOCAL_RANK;
Slurm's srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). Each rank writes a disjoint set of output
shards that every rank computes identically from the plan, so no work is handed out over the wire;
the gloo process group only carries control messages: a barrier, and each rank's outcome.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from .errors import ShardmergeError


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def topology() -> Topology:
    env = os.environ
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if env.get(world):
            try:
                return Topology(int(env.get(rank, 0)), int(env[world]), int(env.get(local, 0)))
            except ValueError:
                raise ShardmergeError(f"{rank}/{world}/{local} in the environment are not integers") from None
    return Topology()


def assign(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Shards by bytes, largest first onto the least-loaded rank: deterministic, so every rank agrees."""
    loads = [0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += size
        owned[rank].append(name)
    return owned


class Group:
    """The gloo control group; a no-op for a single process."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.active = topo.world_size > 1
        if not self.active:
            return
        import torch.distributed as dist

        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ShardmergeError("running as one of several ranks but MASTER_ADDR/MASTER_PORT are not set; launch "
                                  "with torchrun, accelerate launch, or export them in the Slurm script")
        timeout = timedelta(seconds=float(os.environ.get("SHARDMERGE_DIST_TIMEOUT", 3600)))
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=topo.rank, world_size=topo.world_size, timeout=timeout)
        self.dist = dist

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def gather(self, value) -> list:
        """Every rank's value, on every rank (control messages only: small)."""
        if not self.active:
            return [value]
        values = [None] * self.topo.world_size
        self.dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.active and self.dist.is_initialized():
            self.dist.destroy_process_group()
