"""One merge from start to end: plan, claim the output, execute this rank's shards, finalize.

Data flows one way. The planner decides everything from headers; the executor moves bytes; rank 0
finalizes (copies the base's other files, writes the index, then the manifest) only after every rank
has reported success.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._version import __version__
from .config import Plan
from .cuda import resolve_device, tile_budget
from .distributed import Group, Topology, assign, describe_assignment
from .errors import InterruptedMerge, ShardmergeError, os_reason
from .journal import (
    Manifest,
    OutputState,
    ShardRecord,
    adopt_published,
    check_not_inputs,
    clean_tmp,
    drop_changed_inputs,
    finish,
    open_output,
    reopen_finished,
    verify_finished,
)
from .libc import pin_mmap_threshold
from .mergeplan import MergePlan
from .planner import build_plan, describe
from .progress import Progress
from .sources import INDEX_NAME
from .stores import location, retries, store_for
from .units import format_size


@dataclass
class MergeReport:
    output: str
    device: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_budget_bytes: int = 0
    stage_seconds: dict = field(default_factory=dict)
    shards_written: int = 0
    shards_resumed: int = 0
    already_complete: bool = False
    dry_run: bool = False
    ranks: int = 1
    store_retries: int = 0  # transient object-store errors retried (after backoff) by this process
    description: str = ""  # a dry run's plan report (and shard assignment), for the caller to print
    # Per merged tensor: the share of its float32 delta the written output holds, ||round(W+D) - W|| / ||D||.
    delta_survival: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        if self.dry_run:
            return "dry run: nothing written"
        if self.already_complete:
            return f"{self.output}: already complete for this plan; verified, nothing to redo"
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        return (
            f"merged into {self.output} in {self.seconds:.1f}s: {self.tensors_merged} tensors merged, "
            f"{self.tensors_copied} copied, {format_size(self.bytes_written)} written, "
            f"{self.shards_written} shards written, {self.shards_resumed} resumed; peak RSS "
            f"{format_size(self.peak_rss_bytes)}; busy: {stages}"
            + (f"; {self.store_retries} transient storage errors retried" if self.store_retries else "")
        )


def run(plan: Plan, dry_run: bool = False, progress: bool = False, topology: Topology | None = None) -> MergeReport:
    """Merge `plan` as the rank `topology` says (default: a single process), or with `dry_run` only plan
    it and return its description. Prints nothing, unless `progress` asks for the progress bar on stderr."""
    started, retried = time.monotonic(), retries()
    pin_mmap_threshold()  # so that max_memory holds: freed temporaries leave RSS
    with _frozen_heap():
        report = _run(plan, dry_run, progress, topology)
    if not report.dry_run:
        report.seconds = time.monotonic() - started
        report.store_retries = retries() - retried
    return report


@contextlib.contextmanager
def _frozen_heap():
    """Everything alive when a merge starts (torch's modules above all) outlives it. Frozen, it is not scanned
    again by each cyclic collection that planning's and the stages' many short-lived objects trigger: those
    took half of planning's time (0.12 of 0.26 s on a 1.9 GB model)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run(plan: Plan, dry_run: bool, progress: bool, topology: Topology | None) -> MergeReport:
    topo = topology or Topology()
    device = resolve_device(plan.device, topo.local_rank)
    budget = tile_budget(plan, device)
    with tempfile.TemporaryDirectory(prefix="shardmerge-") as scratch:

        def plan_merge() -> MergePlan:
            merge_plan = build_plan(plan, Path(scratch), device, budget)
            if topo.rank == 0:
                for adapter in merge_plan.adapters:
                    for warning in adapter.warnings:
                        print(f"shardmerge: warning: {warning}", file=sys.stderr)
            return merge_plan

        if dry_run:  # every rank checks the plan; the caller prints rank 0's
            merge_plan = plan_merge()
            description = describe(merge_plan)
            if topo.world_size > 1:
                description += "\n" + describe_assignment({s.name: s.size for s in merge_plan.shards}, topo.world_size)
            return MergeReport(
                output=plan.output, device=device, dry_run=True, ranks=topo.world_size, description=description
            )
        group = Group(topo)
        try:

            def prepare() -> MergePlan:
                merge_plan = plan_merge()
                check_not_inputs(
                    location(plan.output), [merge_plan.base.directory] + [a.weights.parent for a in merge_plan.adapters]
                )
                return merge_plan

            merge_plan = _agree(group, topo, prepare)  # a rank that cannot plan (inputs not visible) fails all
            _require_same_merge(group.gather([merge_plan.fingerprint, plan.output]), topo)
            # Rank 0's view of the input files' identities goes into every journal line (another node may
            # number devices differently), so a resume compares like with like.
            merge_plan.inputs = group.gather(merge_plan.inputs)[0]
            report = _run_ranks(merge_plan, topo, group, progress)
        finally:
            group.close()
    return report


def _require_same_merge(views: list, topo: Topology) -> None:
    """Every rank's (fingerprint, output): the fingerprint leaves the output out (a resume may name it
    another way), but ranks writing to different outputs would leave each a part of the model."""
    for rank, (fingerprint, output) in enumerate(views):
        if output != views[0][1]:
            raise ShardmergeError(
                f"rank {rank} of {topo.world_size} writes to {output}, rank 0 to {views[0][1]}; "
                "every rank must be given the same output"
            )
        if fingerprint != views[0][0]:
            raise ShardmergeError(
                f"rank {rank} of {topo.world_size} planned a different merge than rank 0 "
                "(its plan, inputs or device differ); every rank must see the same plan and input files"
            )


def _require_visible(state: OutputState, records: dict[str, ShardRecord], rank: int, topo: Topology) -> None:
    """Rank 0 writes the manifest only over shards it sees: an output on node-local disks (one directory per
    node under the same path) would otherwise look complete on rank 0's node with the others' shards missing."""
    for name, record in records.items():
        stat = state.store.stat(state.directory / name)
        if stat is None or stat.size != record.size:
            raise ShardmergeError(
                f"{state.directory / name}: rank {rank} of {topo.world_size} wrote this shard, but rank 0 does not "
                "see it there; every rank must write to one directory they all share (a shared filesystem or "
                "s3://), not to a node-local disk"
            )


def _agree(group: Group, topo: Topology, step) -> object:
    """Run one step on every rank; if any rank failed, every rank raises, naming the failed rank."""
    value, error = None, None
    try:
        value = step()
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
        error = e
    outcomes = group.gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(outcomes):
        if message is not None:
            raise ShardmergeError(f"rank {rank} of {topo.world_size} failed: {message}")
    return value


def _run_ranks(merge_plan: MergePlan, topo: Topology, group: Group, progress: bool) -> MergeReport:
    """Claim, execute, finalize: three agreed steps across ranks, whose shared state (the output, what is
    finished) is clearest as closures in one function."""
    plan, output = merge_plan.plan, location(merge_plan.plan.output)
    sizes = {s.name: s.size for s in merge_plan.shards}
    state: OutputState | None = None

    def claim():
        nonlocal state
        if topo.rank != 0:
            return None
        state = open_output(output, merge_plan.fingerprint, plan.overwrite)
        return _claim(state, merge_plan, sizes)

    try:
        finished = _agree(group, topo, claim)
        finished = group.gather(finished)[0]
        if finished == "complete":
            return MergeReport(
                output=str(output), device=merge_plan.device, already_complete=True, ranks=topo.world_size
            )
        todo = {name: size for name, size in sizes.items() if name not in finished}
        mine = set(assign(todo, topo.world_size)[topo.rank])
        shards = [s for s in merge_plan.shards if s.name in mine]

        def execute():
            nonlocal state
            if topo.rank != 0:
                state = open_output(output, merge_plan.fingerprint, overwrite=False, lock=False)
            return _execute(merge_plan, state, topo, shards, progress)

        result = _agree(group, topo, execute)
        results = group.gather(result)
        report = _report(merge_plan, results, len(finished), topo)

        def finalize():
            if topo.rank == 0:
                all_shards = dict(state.finished)
                for rank, result in enumerate(results):  # as they came over the wire, JSON
                    records = {name: ShardRecord.from_json(e) for name, e in result["shards"].items()}
                    _require_visible(state, records, rank, topo)
                    all_shards.update(records)
                _finalize(merge_plan, state, all_shards)

        _agree(group, topo, finalize)  # the others exit 0 only once the index and manifest are in
        return report
    finally:
        if state is not None:
            state.release()


def _claim(state: OutputState, merge_plan: MergePlan, sizes: dict[str, int]) -> list[str] | str:
    """Rank 0, on the output it holds: "complete" when there is nothing to redo, else the shards that are
    finished and still good (a shard made from an input that changed since, or that fails its check, is not)."""
    changed = drop_changed_inputs(state, merge_plan.inputs)
    if changed:
        print(
            f"shardmerge: {changed[0]}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''} changed "
            "since shards of this output were written; redoing the shards made from them",
            file=sys.stderr,
        )
    if state.complete:
        bad = verify_finished(state, sizes)
        if not bad and not changed and _finalized(state.directory, merge_plan):
            finish(state)
            return "complete"
        reopen_finished(state)
    else:
        verify_finished(state, sizes)
        adopt_published(state, sizes, merge_plan.inputs, merge_plan.buffers.scratch)
    clean_tmp(state)
    return sorted(state.finished)


def _execute(merge_plan: MergePlan, state: OutputState, topo: Topology, shards, progress_enabled) -> dict:
    from .executor import Executor

    total = sum(s.size for s in shards)
    label = f"rank {topo.rank}" if topo.world_size > 1 else "merge"
    progress = Progress(total, sum(len(s.tasks) for s in shards), progress_enabled, label)
    executor = Executor(merge_plan, state, topo.rank, progress)
    received: list[int] = []
    previous = _install_signal_handlers(executor, received)
    try:
        result = executor.run(shards)
    finally:
        progress.close()
        _restore_signal_handlers(previous)
    if received:
        raise InterruptedMerge(received[0])
    out = asdict(result)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _install_signal_handlers(executor, received: list[int]):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, _frame):
        received.append(signum)
        executor.stop.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous) -> None:
    for sig, old in (previous or {}).items():
        signal.signal(sig, old)


def _report(merge_plan: MergePlan, results: list[dict], resumed: int, topo: Topology) -> MergeReport:
    report = MergeReport(
        output=merge_plan.plan.output, device=merge_plan.device, shards_resumed=resumed, ranks=topo.world_size
    )
    stages: dict[str, float] = {}
    for r in results:
        report.tensors_merged += r["tensors_merged"]
        report.tensors_copied += r["tensors_copied"]
        report.bytes_read += r["bytes_read"]
        report.bytes_written += r["bytes_written"]
        report.shards_written += len(r["shards"])
        report.peak_rss_bytes = max(report.peak_rss_bytes, r["peak_rss_bytes"])
        report.peak_budget_bytes = max(report.peak_budget_bytes, r["peak_budget"])
        for k, v in r["stages"].items():
            stages[k] = stages.get(k, 0.0) + v
    report.stage_seconds = stages
    sums: dict[str, list[float]] = {}
    for r in results:
        sums.update(r["survival"])
    report.delta_survival = {
        name: (kept / delta) ** 0.5 if delta > 0 else 1.0 for name, (kept, delta) in sorted(sums.items())
    }
    report.warnings = _survival_warnings(merge_plan, report.delta_survival)
    return report


SURVIVAL_WARNING = 0.5  # below this share of the delta kept, "most of it was rounded away"


def _survival_warnings(merge_plan: MergePlan, survival: dict[str, float]) -> list[str]:
    lost = sorted((share, name) for name, share in survival.items() if share < SURVIVAL_WARNING)
    if not lost:
        return []
    dtypes = {t.name: t.out_dtype for s in merge_plan.shards for t in s.tasks}
    narrow = any(dtypes.get(name) not in ("BF16", "F16", "F32", "F64") for _, name in lost)
    named = ", ".join(f"{name} ({share:.0%} kept)" for share, name in lost[:3])
    more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
    line = (
        f"most of the adapter's change was rounded away in {len(lost)} of {len(survival)} merged tensors: "
        f"{named}{more}; the output format cannot represent changes that small, use "
        f"{'dtype: bfloat16' if narrow else 'dtype: float32'} to keep them"
    )
    return [line]


def _finalized(output, merge_plan: MergePlan) -> bool:
    names = [p.name for p in merge_plan.base.other_files if p.name not in merge_plan.dropped_files]
    names += [INDEX_NAME] if merge_plan.write_index else []
    return all(store_for(output).stat(output / n) is not None for n in names)


def _finalize(merge_plan: MergePlan, state: OutputState, shards: dict[str, ShardRecord]) -> None:
    try:
        _finalize_files(merge_plan, state, shards)
    except OSError as e:
        raise ShardmergeError(
            f"{e.filename or state.directory}: finishing the output failed: {os_reason(e)}; "
            "every shard "
            "is in, and re-running the same plan finishes it"
        ) from None


def _finalize_files(merge_plan: MergePlan, state: OutputState, shards: dict[str, ShardRecord]) -> None:
    """After every shard is in: the base's other files, then the index, then the manifest, each atomic."""
    output, store = state.directory, state.store
    missing = [s.name for s in merge_plan.shards if s.name not in shards]
    if missing:
        raise ShardmergeError(f"{output}: shards {', '.join(missing[:3])} were not written; re-run to finish")
    files = {}
    for path in merge_plan.base.other_files:
        if path.name in merge_plan.dropped_files:
            continue
        if path.name == "config.json" and merge_plan.config is not None:  # PEFT's merge changed the config
            data = (json.dumps(merge_plan.config, indent=2) + "\n").encode()
            store.put(output / path.name, data)
            files[path.name] = len(data)
        else:
            files[path.name] = store.copy_file(
                store_for(path), path, output / path.name, staging=state.tmp_dir / path.name
            )
    if merge_plan.write_index:
        store.put(output / INDEX_NAME, (json.dumps(merge_plan.index(), indent=2) + "\n").encode())
    plan = merge_plan.plan
    Manifest(
        shardmerge_version=__version__,
        fingerprint=merge_plan.fingerprint,
        base=str(merge_plan.base.directory),
        adapters=[{"path": a.path, "weight": a.weight} for a in merge_plan.adapters],
        options={"dtype": plan.dtype, "max_shard_size": plan.max_shard_size, "device": merge_plan.device},
        shards={name: shards[name] for name in sorted(shards) if name in {s.name for s in merge_plan.shards}},
        index=INDEX_NAME if merge_plan.write_index else None,
        total_size=merge_plan.total_tensor_bytes,
        copied_files=files,
    ).write(store, output)
    finish(state)


def report_json(report: MergeReport) -> str:
    return json.dumps(asdict(report), indent=2)
