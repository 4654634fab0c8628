"""The output directory's state machine (journal.py): fresh -> partial (shards committed one by one, runs
killed and resumed, journal lines torn, shards damaged) -> complete (manifest) -> re-opened, and foreign
directories refused. A model of what should be finished is checked after every step."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardmerge.errors import ShardmergeError
from shardmerge.journal import (
    MANIFEST_NAME,
    STATE_DIR,
    Manifest,
    ShardRecord,
    clean_tmp,
    commit_shard,
    finish,
    open_output,
    reopen_finished,
    verify_finished,
)
from shardmerge.stores.local import LOCAL, file_checksum

SHARDS = {f"model-{i:05d}.safetensors": bytes([i]) * (100 + 37 * i) for i in range(4)}
SIZES = {name: len(data) for name, data in SHARDS.items()}


def write_pending(state, name: str):
    pending = state.create(name, SIZES[name])
    pending.write(SHARDS[name], 0)
    return pending


def manifest_for(state) -> Manifest:
    return Manifest("test", state.fingerprint, "base", [], {}, dict(state.finished), None, 0, {})


class OutputDirectory(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="journal-"))
        self.out = self.root / "out"
        self.state = None
        self.committed: set[str] = set()  # durable: renamed and journaled
        self.damaged: set[str] = set()  # changed since committed, not yet noticed
        self.stale: set[str] = set()  # noticed as changed: left under the final name until redone
        self.stale_journaled: set[str] = set()  # of those, the ones whose journal line is still there
        self.complete = False

    def teardown(self):
        if self.state is not None:
            self.state.release()
        shutil.rmtree(self.root, ignore_errors=True)

    @precondition(lambda self: self.state is None)
    @rule()
    def start_run(self):
        """What the runner does on start: claim, check finished shards, clear leftovers."""
        self.state = open_output(self.out, "plan-A", overwrite=False)
        assert self.state.complete == self.complete
        if self.complete:
            return
        bad = verify_finished(self.state, SIZES)
        assert set(bad) == (self.damaged & self.committed) | self.stale_journaled
        self.stale_journaled |= self.damaged & self.committed
        self.stale |= self.damaged
        self.committed -= self.damaged
        self.damaged.clear()
        clean_tmp(self.state)
        assert set(self.state.finished) == self.committed
        assert not any(self.state.tmp_dir.iterdir())

    @precondition(lambda self: self.state is not None and not self.complete)
    @rule(name=st.sampled_from(sorted(SHARDS)))
    def commit(self, name):
        if name in self.committed:
            return
        record = commit_shard(self.state, 0, name, write_pending(self.state, name), SIZES[name], 4096)
        assert record == ShardRecord(SIZES[name], {"xxh3_128": file_checksum(self.out / name)})
        assert not any(self.state.tmp_dir.iterdir()) and self.state.finished[name] == record
        self.committed.add(name)
        self.stale.discard(name)
        self.stale_journaled.discard(name)

    @precondition(lambda self: self.state is not None and not self.complete)
    @rule(name=st.sampled_from(sorted(SHARDS)), torn=st.booleans())
    def killed(self, name, torn):
        """SIGKILL mid-shard: a partial file under tmp, maybe a torn journal line; nothing else changes."""
        os.close(write_pending(self.state, name).fd)  # the process dies: never published nor aborted
        if torn:
            with open(self.state.state_dir / "journal-r0.jsonl", "a") as f:
                f.write('{"shard": "' + name + '", "si')
        self.state.release()
        self.state = None

    @precondition(lambda self: self.state is None and not self.complete)
    @rule(name=st.sampled_from(sorted(SHARDS)))
    def damage(self, name):
        path = self.out / name
        if path.exists():
            data = bytearray(path.read_bytes())
            data[0] = (SHARDS[name][0] + 1) % 256  # differs from the real byte however often it is damaged
            path.write_bytes(bytes(data))
            self.damaged.add(name)

    @precondition(lambda self: self.state is not None and not self.complete and self.committed == set(SHARDS))
    @rule()
    def finalize(self):
        manifest_for(self.state).write(LOCAL, self.out)
        finish(self.state)
        self.state, self.complete = None, True
        assert not (self.out / STATE_DIR).exists()

    @precondition(lambda self: self.state is not None and self.complete)
    @rule()
    def reopen_after_damage(self):
        """A finished output whose shard changed becomes partial again, keeping its good shards."""
        path = self.out / sorted(SHARDS)[0]
        path.write_bytes(bytes([(SHARDS[path.name][0] + 1) % 256]) + path.read_bytes()[1:])
        verify_finished(self.state, SIZES)
        reopen_finished(self.state)
        assert not (self.out / MANIFEST_NAME).exists()
        self.state.release()
        self.state, self.complete = None, False
        self.committed.discard(path.name)
        self.stale.add(path.name)

    @precondition(lambda self: self.state is not None)
    @rule()
    def second_run_is_locked_out(self):
        with pytest.raises(ShardmergeError, match="another shardmerge run"):
            open_output(self.out, "plan-A", overwrite=False)

    @precondition(lambda self: self.state is None and self.out.exists() and any(self.out.iterdir()))
    @rule()
    def another_plan_is_refused(self):
        with pytest.raises(ShardmergeError, match="different plan"):
            open_output(self.out, "plan-B", overwrite=False)

    @invariant()
    def final_names_hold_only_complete_shards(self):
        for name in self.committed - self.damaged:
            assert (self.out / name).read_bytes() == SHARDS[name]
        for name in set(SHARDS) - self.committed - self.stale - self.damaged:
            assert not (self.out / name).exists()

    @invariant()
    def manifest_exactly_when_complete(self):
        assert (self.out / MANIFEST_NAME).exists() == self.complete
        if self.complete:
            manifest = Manifest.read(LOCAL, self.out)
            assert manifest is not None and set(manifest.shards) == set(SHARDS)


OutputDirectory.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
test_output_directory_state_machine = OutputDirectory.TestCase


def test_manifest_round_trips_and_garbage_reads_as_none(tmp_path):
    manifest = Manifest(
        "0.1.0",
        "fp",
        "/base",
        [{"path": "a", "weight": 1.0}],
        {"dtype": "keep"},
        {"s.safetensors": ShardRecord(10, {"xxh3_128": "ab" * 16})},
        None,
        10,
        {"config.json": 3},
    )
    manifest.write(LOCAL, tmp_path)
    assert Manifest.read(LOCAL, tmp_path) == manifest
    (tmp_path / MANIFEST_NAME).write_text('{"fingerprint": "fp"}')
    assert Manifest.read(LOCAL, tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("[1, 2")
    assert Manifest.read(LOCAL, tmp_path) is None


def test_journal_lines_of_another_plan_are_not_resumed(tmp_path):
    out = tmp_path / "out"
    state = open_output(out, "plan-A", overwrite=False)
    name = sorted(SHARDS)[0]
    commit_shard(state, 0, name, write_pending(state, name), SIZES[name], 4096)
    state.release()
    (out / STATE_DIR / "state.json").write_text('{"fingerprint": "plan-B"}')
    state = open_output(out, "plan-B", overwrite=False)
    assert state.finished == {}  # plan-A's line does not count for plan-B
    state.release()
