"""The output directory's bookkeeping: what is finished, for which plan, and when it is complete.

Layout while a merge runs:
    OUTPUT/.shardmerge/state.json       the plan fingerprint this directory belongs to
    OUTPUT/.shardmerge/journal-rN.jsonl one line per finished shard (name, size, XXH3-128 checksum), per writer
    OUTPUT/.shardmerge/tmp/             shards being written; never a final name
    OUTPUT/.shardmerge/lock             flock'd by the running merge
Shards are fsynced, renamed to their final names, the directory fsynced, then journaled. The index and
then `shardmerge-manifest.json` are written last; the manifest is what marks the output complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ShardmergeError
from .stores import PendingFile, Store, store_for

STATE_DIR = ".shardmerge"
MANIFEST_NAME = "shardmerge-manifest.json"
_STATE_FILE_LIMIT = 64 * 2**20


@dataclass
class OutputState:
    directory: Path  # a location in a store
    fingerprint: str
    finished: dict[str, dict] = field(default_factory=dict)  # shard name -> {"size", checksum record}
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

    def create(self, name: str, size: int, copies=()) -> PendingFile:
        """An output shard to write at planned offsets; it appears under its name only when published."""
        return self.store.create(self.directory / name, size, self.tmp_dir / f"{name}.partial", copies)

    def journal(self, rank: int, name: str, size: int, checksum: dict, inputs: dict | None) -> None:
        """Record one finished shard durably (the shard itself is already published), with the identity of
        every input file it was made from."""
        entry = {"shard": name, "size": size, **checksum, "inputs": inputs, "fingerprint": self.fingerprint}
        self.store.append(self.state_dir / f"journal-r{rank}.jsonl", (json.dumps(entry) + "\n").encode())
        self.finished[name] = {"size": size, **checksum, "inputs": inputs}

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
    return [p for p in state.store.list(state.state_dir) if p.name.startswith("journal-r") and p.name.endswith(".jsonl")]


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
                finished[entry["shard"]] = {k: v for k, v in entry.items() if k not in ("shard", "fingerprint")}
    return finished


def _lock(state: OutputState) -> object:
    handle = state.store.lock(state.state_dir / "lock")
    if handle is None:
        raise ShardmergeError(f"{state.directory}: another shardmerge run is writing this directory; wait for it or "
                              "choose another output")
    return handle


def open_output(output, fingerprint: str, overwrite: bool, lock: bool = True) -> OutputState:
    """Claim the output directory for this plan: fresh, resumed, already complete, or refused."""
    state = OutputState(output, fingerprint)
    state.store.make_dirs(output)

    def inspect():
        manifest = _load_json(state.store, output / MANIFEST_NAME)
        recorded = _load_json(state.store, state.state_dir / "state.json")
        ours = (manifest or recorded or {}).get("fingerprint")
        entries = [p for p in state.store.list(output) if p.name != STATE_DIR or recorded is not None]
        foreign = bool(entries) and ours != fingerprint
        if foreign and not overwrite:
            state.release()
            what = ("the finished output of a different plan" if manifest else
                    "a partial output of a different plan" if recorded else "files shardmerge did not write")
            raise ShardmergeError(f"{output}: directory is not empty and holds {what}; choose an empty output "
                                  "directory or set overwrite: true (--overwrite) to replace its contents")
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
    if manifest and manifest.get("fingerprint") == fingerprint:
        state.complete = True
        state.finished = dict(manifest.get("shards", {}))
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
    for name, entry in sorted(state.finished.items()):
        checksum = {k: v for k, v in entry.items() if k not in ("size", "inputs")}
        state.journal(0, name, entry["size"], checksum, entry.get("inputs"))
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


def verify_finished(state: OutputState, expected_sizes: dict[str, int], scratch_size: int = 8 * 2**20) -> list[str]:
    """Finished shards that are no longer what the journal says (missing, resized, changed): redo them."""
    bad = []
    for name, entry in list(state.finished.items()):
        path = state.directory / name
        stat = state.store.stat(path)
        ok = (name in expected_sizes and stat is not None and stat.size == entry["size"] == expected_sizes[name]
              and checksum_matches(state.store.checksum(path, scratch_size), entry))
        if not ok:
            bad.append(name)
            del state.finished[name]
    return bad


def checksum_matches(checksum: dict, entry: dict) -> bool:
    """Whether a file's checksum record agrees with a journal or manifest entry."""
    return all(entry.get(k) == v for k, v in checksum.items())


def drop_changed_inputs(state: OutputState, inputs: dict[str, dict]) -> list[str]:
    """Finished shards made from another version of an input than the plan reads now (a base shard
    re-downloaded from another revision under the same header, an adapter re-saved) are redone, so the output
    never mixes two versions; shards journaled without identities are redone too. Returns the changed files."""
    changed = set()
    for name, entry in list(state.finished.items()):
        recorded, now = entry.get("inputs") or {}, inputs.get(name, {})
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
