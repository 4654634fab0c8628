"""Running one merge across processes and nodes with torch.distributed.

Ranks come from the launcher's environment: torchrun and accelerate set RANK/WORLD_SIZE/LOCAL_RANK;
Slurm's srun sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID. Each rank writes a disjoint set of
output shards that every rank computes identically from the plan, so no work is handed out over the wire.

The ranks only exchange control messages (each rank's outcome: a few hundred bytes), through the
torch.distributed rendezvous store (a TCPStore hosted by rank 0, or by torchrun's agent) rather than through
collectives. The reason is waiting: a rank with little or no work (more ranks than shards) waits for the
busiest rank for as long as that rank merges, which for a large model is hours, so a collective's fixed
timeout would either kill healthy long jobs or take hours to notice a dead rank. Instead every rank bumps a
heartbeat counter in the store from a background thread; a waiting rank waits as long as the ranks it waits
for are alive, and fails within SHARDMERGE_DIST_TIMEOUT seconds (default 300) of one going silent (killed,
out of memory, node lost), naming that rank. A rank that leaves early (it failed) marks itself as gone, so
the others stop waiting for it at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from .errors import ShardmergeError
from .units import format_size

DEFAULT_TIMEOUT = 300.0
_PREFIX = "shardmerge"


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


# (rank, world size, local rank) variables, by launcher. torchrun/accelerate first: torchrun started by srun
# (one task per node) sees both, and torchrun's are the per-process ones. For Slurm the world size is
# SLURM_STEP_NUM_TASKS, which only srun sets: the batch script itself also carries SLURM_NTASKS and
# SLURM_PROCID=0, and a plain `python -m shardmerge` there (a dry run, a single-process merge) must not take
# itself for rank 0 of several and wait for ranks that were never started.
_LAUNCHERS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))


def topology() -> Topology:
    env = os.environ
    for rank_var, world_var, local_var in _LAUNCHERS:
        if not env.get(world_var, "").strip():
            continue
        try:
            rank, world, local = int(env.get(rank_var) or 0), int(env[world_var]), int(env.get(local_var) or 0)
        except ValueError:
            raise ShardmergeError(
                f"{rank_var}/{world_var}/{local_var} in the environment are not integers "
                f"({env.get(rank_var)!r}/{env.get(world_var)!r}/{env.get(local_var)!r})"
            ) from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ShardmergeError(
                f"{rank_var}={rank} {world_var}={world} {local_var}={local} in the environment "
                "do not describe a rank of a job"
            )
        return Topology(rank, world, local)
    return Topology()


def assign(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Shards by bytes, largest first onto the least-loaded rank: deterministic, so every rank agrees.

    Ties break by name (shards) and by rank number (ranks); each rank's list is in file-name order.
    Ranks beyond the number of shards get an empty list.
    """
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    loads = [0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], len(owned[r]), r))
        loads[rank] += size
        owned[rank].append(name)
    return [sorted(names) for names in owned]


def dist_timeout() -> float:
    raw = os.environ.get("SHARDMERGE_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ShardmergeError(f"SHARDMERGE_DIST_TIMEOUT={raw!r} must be a positive number of seconds")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class Group:
    """The ranks of one merge, exchanging control messages; a no-op for a single process.

    Messages are JSON (dicts, lists, strings, numbers): the store is an unauthenticated TCP port, so nothing
    read from it is unpickled."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.active = topo.world_size > 1
        self._seq = 0
        self._closed = False
        if not self.active:
            return
        addr, port = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "").strip()
        if not addr or not port:
            raise ShardmergeError(
                f"rank {topo.rank} of {topo.world_size}: MASTER_ADDR/MASTER_PORT are not set; "
                "launch with torchrun or accelerate launch, or export them in the Slurm script "
                "(see configs/slurm-merge.sbatch)"
            )
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ShardmergeError(f"MASTER_PORT={port!r} is not a TCP port number")
        self.where = f"{addr}:{port}"
        self.timeout = dist_timeout()
        self.interval = min(max(self.timeout / 10, 0.2), 5.0)  # heartbeat period, and how often liveness is checked
        import torch.distributed as dist

        try:
            store, _, _ = next(
                dist.rendezvous(
                    f"env://?rank={topo.rank}&world_size={topo.world_size}", timeout=timedelta(seconds=self.timeout)
                )
            )
            self.store = dist.PrefixStore(_PREFIX, store)
            self.store.set(f"hb/{topo.rank}", b"0")
            beat_store = dist.PrefixStore(_PREFIX, store.clone())  # its own connection, for the heartbeat thread
        except Exception as e:  # noqa: BLE001 - torch raises several types here; all mean "could not join"
            raise ShardmergeError(
                f"rank {topo.rank} of {topo.world_size}: could not join the other ranks at {self.where} within "
                f"{self.timeout:.0f}s ({_first_line(e)}); check that all {topo.world_size} ranks were started "
                "and that MASTER_ADDR/MASTER_PORT name rank 0's node and a free port"
            ) from None
        self._stop = threading.Event()
        self._heart = threading.Thread(
            target=self._heartbeat, args=(beat_store,), name="shardmerge-heartbeat", daemon=True
        )
        self._heart.start()

    # -- liveness ---------------------------------------------------------------------------------------
    def _heartbeat(self, store) -> None:
        key = f"hb/{self.topo.rank}"
        while not self._stop.wait(self.interval):
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone; the main thread reports it on its next call
                return

    def _lost(self, e: BaseException) -> ShardmergeError:
        return ShardmergeError(
            f"rank {self.topo.rank} of {self.topo.world_size}: lost contact with the rendezvous "
            f"store at {self.where}, hosted by rank 0 (or by torchrun's agent): {_first_line(e)}; "
            "rank 0 or its node probably failed, see its log; re-run to resume"
        )

    def _wait_for(self, keys: dict[int, str], left_is_error: bool = True) -> None:
        """Wait until every rank in `keys` has set its key, for as long as those ranks are alive.

        Cheap while waiting (one store call per poll); every `interval`, or when a rank has left, each pending
        rank is looked at: one that left (closed its group: it failed) or whose heartbeat has not moved for the
        timeout is reported by number."""
        pending = dict(keys)
        seen: dict[int, tuple[bytes | None, float]] = {}
        poll, next_sweep, left_seen = 0.01, 0.0, None
        try:
            while pending and not self.store.check(list(pending.values())):
                now = time.monotonic()
                left = self.store.add("left", 0)
                if left != left_seen or now >= next_sweep:
                    left_seen, next_sweep = left, now + self.interval
                    for rank in list(pending):
                        self._look_at(rank, pending, seen, now, left_is_error)
                    continue
                time.sleep(poll)
                poll = min(poll * 2, 0.25)
        except ShardmergeError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken store connection
            raise self._lost(e) from None

    def _look_at(self, rank: int, pending: dict, seen: dict, now: float, left_is_error: bool) -> None:
        if self.store.check([pending[rank]]):
            del pending[rank]
            return
        if self.store.check([f"left/{rank}"]):
            if not left_is_error:
                del pending[rank]
                return
            raise ShardmergeError(
                f"rank {rank} of {self.topo.world_size} stopped early (it failed: see its error); "
                "nothing was marked complete, re-run to resume"
            )
        beat = self.store.get(f"hb/{rank}") if self.store.check([f"hb/{rank}"]) else None
        if rank not in seen or seen[rank][0] != beat:
            seen[rank] = (beat, now)
        elif now - seen[rank][1] > self.timeout:
            state = "never joined" if beat is None else f"no heartbeat for {self.timeout:.0f}s"
            raise ShardmergeError(
                f"rank {rank} of {self.topo.world_size} stopped responding ({state}: killed, out "
                "of memory, or its node failed; see its log); nothing was marked complete, re-run "
                "to resume"
            )

    # -- messages ---------------------------------------------------------------------------------------
    def gather(self, value) -> list:
        """Every rank's value, on every rank, in rank order (control messages only: small, JSON)."""
        if not self.active:
            return [value]
        if self._closed:
            raise ShardmergeError("internal error: the rank group is already closed")
        seq, self._seq = self._seq, self._seq + 1
        me, world = self.topo.rank, self.topo.world_size
        keys = {r: f"v/{seq}/{r}" for r in range(world)}
        data = json.dumps(value).encode()
        try:
            self.store.set(keys[me], data)
        except Exception as e:  # noqa: BLE001
            raise self._lost(e) from None
        self._wait_for({r: k for r, k in keys.items() if r != me})
        try:
            return [json.loads(data if r == me else self.store.get(keys[r])) for r in range(world)]
        except Exception as e:  # noqa: BLE001
            raise self._lost(e) from None

    def close(self) -> None:
        """Leave the group. The rank that hosts the store (rank 0, unless torchrun's agent does) waits until
        every other rank has left or died, so that none loses the store while still reading from it."""
        if not self.active or self._closed:
            return
        self._closed = True
        try:
            self.store.set(f"left/{self.topo.rank}", b"1")
            self.store.add("left", 1)
            if self.topo.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                try:
                    self._wait_for({r: f"left/{r}" for r in range(1, self.topo.world_size)}, left_is_error=False)
                except ShardmergeError:
                    pass  # a dead rank needs no store
        except Exception:  # noqa: BLE001 - leaving must not mask the error that brought us here
            pass
        finally:
            self._stop.set()


def describe_assignment(sizes: dict[str, int], world_size: int) -> str:
    """What each rank writes, for a dry run under several ranks."""
    lines = [f"ranks: {world_size}"]
    for rank, names in enumerate(assign(sizes, world_size)):
        total = sum(sizes[n] for n in names)
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        what = f": {shown}" if names else " (idle: more ranks than shards)"
        lines.append(f"  rank {rank}: {len(names)} shard(s), {format_size(total)}{what}")
    return "\n".join(lines)
