"""The output directory's bookkeeping: what is finished, for which plan, and when it is complete.

Layout while a merge runs:
    OUTPUT/.shardmerge/state.json       the plan fingerprint this directory belongs to
    OUTPUT/.shardmerge/journal-rN.jsonl one line per finished shard (name, size, XXH3-128 checksum), per writer
    OUTPUT/.shardmerge/tmp/             shards being written; never a final name
    OUTPUT/.shardmerge/lock             flock'd by the running merge
A shard is committed by commit_shard: published by its store (fsynced, checksummed, renamed to its final
name, the directory fsynced), then journaled. A shard published but not journaled (killed in between) is
adopted by the next run only where its store proves it is this plan's shard (adopt_published), else redone.
The index and then `shardmerge-manifest.json` (a Manifest) are written last; the manifest is what marks the
output complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ShardmergeError
from .stores import PendingFile, Store, store_for
from .units import IO_BUFFER, MiB

STATE_DIR = ".shardmerge"
MANIFEST_NAME = "shardmerge-manifest.json"
_STATE_FILE_LIMIT = 64 * MiB


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as the journal and the manifest record it: its size and its store's checksum record
    (XXH3-128 on a local disk), flattened into one JSON object on disk."""

    size: int
    checksum: dict
    inputs: dict | None = None  # identity (Store.stat) of every input file the shard was made from

    def to_json(self) -> dict:
        return {"size": self.size, **self.checksum, "inputs": self.inputs}

    @classmethod
    def from_json(cls, entry: dict) -> ShardRecord:
        checksum = {k: v for k, v in entry.items() if k not in ("size", "inputs", "shard", "fingerprint")}
        return cls(entry["size"], checksum, entry.get("inputs"))

    def matches(self, checksum: dict) -> bool:
        """Whether a file's checksum record (Store.checksum) agrees with this one."""
        return all(self.checksum.get(k) == v for k, v in checksum.items())


@dataclass
class Manifest:
    """`shardmerge-manifest.json`: written last, it marks the output complete and says what it holds."""

    shardmerge_version: str
    fingerprint: str
    base: str
    adapters: list[dict]  # {"path", "weight"}
    options: dict  # dtype, max_shard_size, device
    shards: dict[str, ShardRecord]
    index: str | None  # the index file's name, when there is one
    total_size: int  # bytes of tensor data in all shards
    copied_files: dict[str, int]  # the base's other files, with their sizes

    def write(self, store: Store, directory) -> None:
        record = {**asdict(self), "shards": {name: r.to_json() for name, r in self.shards.items()}}
        store.put(directory / MANIFEST_NAME, (json.dumps(record, indent=2) + "\n").encode())

    @classmethod
    def read(cls, store: Store, directory) -> Manifest | None:
        """The manifest in `directory`, or None where it is missing, unreadable or not one of ours."""
        raw = _load_json(store, directory / MANIFEST_NAME)
        try:
            shards = {name: ShardRecord.from_json(entry) for name, entry in raw["shards"].items()}
            return cls(**{**raw, "shards": shards})
        except (KeyError, TypeError, AttributeError):
            return None


@dataclass
class OutputState:
    directory: Path  # a location in a store
    fingerprint: str
    finished: dict[str, ShardRecord] = field(default_factory=dict)  # shard name -> record
    complete: bool = False
    lock: object = None  # the store's lock handle while this run holds the output

    @property
    def store(self) -> Store:
        return store_for(self.directory)

    @property
    def state_dir(self) -> Path:
        return self.directory / STATE_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

    def create(self, name: str, size: int, copies=(), inputs: dict | None = None) -> PendingFile:
        """An output shard to write at planned offsets; it appears under its name only when published, tagged
        with what it is (shard_tag) so that a resume can adopt it if the kill came before its journal line."""
        tag = shard_tag(self.fingerprint, name, inputs)
        return self.store.create(self.directory / name, size, self.tmp_dir / f"{name}.partial", copies, tag)

    def journal(self, rank: int, name: str, record: ShardRecord) -> None:
        """Record one finished shard durably (the shard itself is already published)."""
        entry = {"shard": name, **record.to_json(), "fingerprint": self.fingerprint}
        self.store.append(self.state_dir / f"journal-r{rank}.jsonl", (json.dumps(entry) + "\n").encode())
        self.finished[name] = record

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def shard_tag(fingerprint: str, name: str, inputs: dict | None) -> str:
    """What a published shard is, in one string its store keeps with it: this plan's shard `name` made from
    these versions of its input files. Equal tags mean the same bytes (the output is deterministic)."""
    return hashlib.sha256(json.dumps([fingerprint, name, inputs], sort_keys=True).encode()).hexdigest()[:32]


def adopt_published(state: OutputState, sizes: dict[str, int], inputs: dict[str, dict], scratch_size: int) -> None:
    """Shards published under their final names whose journal line a kill prevented: each one whose store
    proves it is this plan's shard from these inputs (its tag, its size and, where the store can, a checksum
    kept with it) is journaled now instead of being written again."""
    present = {path.name for path in state.store.list(state.directory)}  # one listing, not a stat per shard
    for name, size in sizes.items():
        if name in state.finished or name not in present:
            continue
        tag = shard_tag(state.fingerprint, name, inputs.get(name))
        checksum = state.store.adopt(state.directory / name, size, tag, scratch_size)
        if checksum is not None:
            state.journal(0, name, ShardRecord(size, checksum, inputs.get(name)))


def commit_shard(
    state: OutputState,
    rank: int,
    name: str,
    pending: PendingFile,
    size: int,
    scratch_size: int,
    inputs: dict | None = None,
) -> ShardRecord:
    """The commit protocol for one written shard: publish it (the store fsyncs it, checksums it through a
    buffer of `scratch_size`, renames it to its final name and fsyncs the directory), then journal it. A
    kill at any point leaves no shard under its final name or a complete one, perhaps not yet journaled (the
    next run then adopts it if its store can prove what it is, else redoes it). If publishing fails the pending
    file is aborted. `inputs` are the identities of the input files the shard was made from, so a resume can
    tell that an input changed."""
    try:
        checksum = pending.publish(scratch_size)
    except BaseException:
        pending.abort()
        raise
    record = ShardRecord(size, checksum, inputs)
    state.journal(rank, name, record)
    return record


def check_not_inputs(output, inputs: list) -> None:
    """The output may not be, lie inside, or contain any input: nothing the user had is touched."""
    out = store_for(output).real(output)
    for path in inputs:
        src = store_for(path).real(path)
        if type(src) is not type(out):
            continue
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise ShardmergeError(f"{output}: the output directory overlaps the input {path}; choose another output")


def _journals(state: OutputState) -> list:
    return [
        p for p in state.store.list(state.state_dir) if p.name.startswith("journal-r") and p.name.endswith(".jsonl")
    ]


def _read_journals(state: OutputState) -> dict[str, dict]:
    finished = {}
    for path in _journals(state):
        text = state.store.read_small(path, _STATE_FILE_LIMIT).decode("utf-8", errors="replace")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line from a kill mid-append: that shard is simply redone
            if isinstance(entry, dict) and entry.get("fingerprint") == state.fingerprint and "shard" in entry:
                finished[entry["shard"]] = ShardRecord.from_json(entry)
    return finished


def _lock(state: OutputState) -> object:
    handle = state.store.lock(state.state_dir / "lock")
    if handle is None:
        raise ShardmergeError(
            f"{state.directory}: another shardmerge run is writing this directory; wait for it or choose another output"
        )
    return handle


def open_output(output, fingerprint: str, overwrite: bool, lock: bool = True) -> OutputState:
    """Claim the output directory for this plan: fresh, resumed, already complete, or refused."""
    state = OutputState(output, fingerprint)
    state.store.make_dirs(output)

    def inspect():
        manifest = Manifest.read(state.store, output)
        recorded = _load_json(state.store, state.state_dir / "state.json")
        ours = manifest.fingerprint if manifest else (recorded or {}).get("fingerprint")
        entries = [p for p in state.store.list(output) if p.name != STATE_DIR or recorded is not None]
        foreign = bool(entries) and ours != fingerprint
        if foreign and not overwrite:
            state.release()
            what = (
                "the finished output of a different plan"
                if manifest
                else "a partial output of a different plan"
                if recorded
                else "files shardmerge did not write"
            )
            raise ShardmergeError(
                f"{output}: directory is not empty and holds {what}; choose an empty output "
                "directory or set overwrite: true (--overwrite) to replace its contents"
            )
        return manifest, recorded, foreign

    inspect()  # refuse before writing anything
    state.store.make_dirs(state.state_dir)
    if lock:
        state.lock = _lock(state)
    manifest, recorded, foreign = inspect()  # again, now that no other run can change it
    if foreign:
        state.store.abort_uploads(output)
        _clear(state.store, output, keep=state.state_dir / "lock")
        state.store.make_dirs(state.state_dir)
        manifest = recorded = None
    if manifest and manifest.fingerprint == fingerprint:
        state.complete = True
        state.finished = dict(manifest.shards)
        return state
    state.store.make_dirs(state.tmp_dir)
    if recorded is None:
        _record_plan(state)
    state.finished = _read_journals(state)
    return state


def _record_plan(state: OutputState) -> None:
    state.store.put(state.state_dir / "state.json", json.dumps({"fingerprint": state.fingerprint}).encode())


def reopen_finished(state: OutputState) -> None:
    """A finished output that no longer checks out becomes a partial one again: its good shards are
    journaled, then the manifest goes, so a kill at any point still leaves a resumable directory."""
    state.complete = False
    state.store.make_dirs(state.tmp_dir)
    _record_plan(state)
    for name, record in sorted(state.finished.items()):
        state.journal(0, name, record)
    state.store.delete(state.directory / MANIFEST_NAME)


def _load_json(store: Store, path) -> dict | None:
    try:
        value = json.loads(store.read_small(path, _STATE_FILE_LIMIT).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _clear(store: Store, output, keep) -> None:
    for path in store.list(output):
        if path == keep.parent:
            _clear(store, path, keep)
        elif path != keep:
            store.delete(path)


def verify_finished(state: OutputState, expected_sizes: dict[str, int], scratch_size: int = IO_BUFFER) -> list[str]:
    """Finished shards that are no longer what the journal says (missing, resized, changed): redo them."""
    bad = []
    for name, record in list(state.finished.items()):
        path = state.directory / name
        stat = state.store.stat(path)
        ok = (
            name in expected_sizes
            and stat is not None
            and stat.size == record.size == expected_sizes[name]
            and record.matches(state.store.checksum(path, scratch_size))
        )
        if not ok:
            bad.append(name)
            del state.finished[name]
    return bad


def drop_changed_inputs(state: OutputState, inputs: dict[str, dict]) -> list[str]:
    """Finished shards made from another version of an input than the plan reads now (a base shard
    re-downloaded from another revision under the same header, an adapter re-saved) are redone, so the output
    never mixes two versions; shards journaled without identities are redone too. Returns the changed files."""
    changed = set()
    for name, record in list(state.finished.items()):
        recorded, now = record.inputs or {}, inputs.get(name, {})
        if recorded != now:
            changed |= {path for path in set(recorded) | set(now) if recorded.get(path) != now.get(path)}
            del state.finished[name]
    return sorted(changed)


def clean_tmp(state: OutputState) -> None:
    """Remove shards a killed run left half-written; they were never journaled. A store that can take up
    an unfinished upload keeps its records, for the same plan to resume."""
    if not state.store.resumes_partials:
        state.store.delete(state.tmp_dir)
        state.store.make_dirs(state.tmp_dir)
    for directory in (state.directory, state.state_dir):
        for path in state.store.list(directory):
            if path.name.startswith(".") and ".tmp-" in path.name:
                state.store.delete(path)


def finish(state: OutputState) -> None:
    """After the manifest is written: drop the bookkeeping, release the lock."""
    state.store.delete(state.tmp_dir)
    state.store.abort_uploads(state.directory)  # a killed run's upload whose record never got written
    for path in _journals(state):
        state.store.delete(path)
    state.store.delete(state.state_dir / "state.json")
    state.store.delete(state.state_dir / "lock")  # while still held: no run can lock the old file after us
    state.release()
    state.store.remove_empty_dir(state.state_dir)
