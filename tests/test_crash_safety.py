"""Crash safety, resume and refusal: a killed, interrupted or failed merge leaves a resumable output, and
re-running the same plan produces exactly the bytes of an uninterrupted run; the inputs are never touched.

Fault injection. Starting `python -m shardmerge` costs ~4 s here (importing torch), so the kill-point sweep
forks the test process instead: each child runs the CLI entry point (`shardmerge.cli.main`, what
`python -m shardmerge` calls) with one hook that SIGKILLs the child at the N-th call of a write-layer
function (tile/header writes, kernel copies, renames, fsyncs, journal appends, unlinks). Counting calls
makes every kill point exact and reproducible, unlike kill-after-a-delay. A few behaviours that depend on
the real interpreter (signals, exit codes, stderr, an external SIGKILL) run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import models  # noqa: E402
from helpers.adapters import write_adapter, write_tiny_adapter  # noqa: E402
from helpers.plans import at_call, fork_cli, killed_run, run_cli, write_plan  # noqa: E402

import shardmerge  # noqa: E402
import shardmerge.journal as journal_mod  # noqa: E402
import shardmerge.stores.local as local_mod  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures and helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Inputs shared by every test, the reference output of an uninterrupted run, and the inputs' hashes."""
    root = tmp_path_factory.mktemp("model")
    base = models.write_tiny_base(root / "base")
    adapter = write_tiny_adapter(root / "adapter")
    plan = write_plan(
        root / "reference.yaml", base=base, adapters=[adapter], output=root / "reference", **models.TINY_OPTIONS
    )
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    reference = models.tree_bytes(root / "reference")
    assert models.MANIFEST_NAME in reference and models.INDEX_NAME in reference
    assert not any(name.startswith(models.STATE_DIR) for name in reference)
    return {
        "root": root,
        "base": base,
        "adapter": adapter,
        "reference": reference,
        "inputs": models.tree_hashes(base, adapter),
    }


@pytest.fixture(autouse=True)
def inputs_untouched(model):
    """After every test, whatever it did (kills, failures, refusals): the inputs are byte for byte and
    mtime for mtime what they were."""
    yield
    assert models.tree_hashes(model["base"], model["adapter"]) == model["inputs"], "an input file was modified"


def make_plan(model, directory: Path, name="plan.yaml", output=None, weight=1.0, adapter=None, **options) -> Path:
    """A plan merging the shared inputs (or `adapter` in place of theirs) with `weight` into `output`."""
    adapters = [{"path": adapter or model["adapter"], "weight": weight}]
    output = output or directory / "out"
    return write_plan(
        directory / name, base=model["base"], adapters=adapters, output=output, **models.TINY_OPTIONS, **options
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("shardmerge: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


HOOK_TARGETS = {
    "pwrite": (local_mod, "pwrite_all"),  # shard headers and merged tiles
    "copy": (local_mod, "copy_range"),  # untouched tensors, copied in the kernel
    "replace": (os, "replace"),  # state.json, shard renames, copied config files, index, manifest
    "fsync": (os, "fsync"),
    "journal": (journal_mod.OutputState, "journal"),  # before = after the rename, before the journal line
    "unlink": (os, "unlink"),  # the bookkeeping removal in finish()
}


def killed_at(plan: Path, target: str, n: int, after: bool = False) -> int:
    """The wait status of a forked run of `plan` that SIGKILLs itself at the n-th call of a HOOK_TARGETS function."""
    return killed_run(plan, *HOOK_TARGETS[target], n, after)


def assert_killed(status: int) -> None:
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child was not killed at the hook (wait status {status:#x}); the kill point is out of range"
    )


def assert_no_incomplete_shard(out: Path, reference: dict[str, bytes]) -> None:
    """Whatever moment a run stopped at, a shard under its final name is complete and correct."""
    for path in out.glob("*.safetensors"):
        assert path.read_bytes() == reference[path.name], f"{path.name} is under its final name but incomplete"


def assert_resumes_to_reference(plan: Path, out: Path, reference: dict[str, bytes], context: str) -> None:
    result = run_cli(plan, "-q")
    assert result.returncode == 0, f"resume failed ({context}): {result.stderr}"
    models.assert_same_tree(out, reference, context)
    assert not (out / models.STATE_DIR).exists()


# -- fault injection: SIGKILL at exact points, then resume ---------------------------------------------------
# A clean run of the test model makes 107 pwrite_all calls (7 headers + 100 tiles), 11 kernel copies,
# 13 renames (state.json, 7 shards, 3 config files, index, manifest), 7 journal lines, 31 fsyncs and a few
# unlinks (finish()). Each point is (function, N-th call, kill before or after the call).
KILL_POINTS = [
    *[("pwrite", n, False) for n in (1, 2, 8, 15, 30, 50, 70, 90, 107)],
    *[("pwrite", n, True) for n in (20, 60, 100)],
    *[("copy", n, False) for n in (1, 6, 11)],
    *[("replace", n, False) for n in range(1, 14)],  # every rename, incl. inside atomic_write (index, manifest)
    *[("replace", n, True) for n in (2, 8, 13)],  # renamed, directory not yet fsynced / journaled
    *[("journal", n, False) for n in (1, 4, 7)],  # between a shard's rename and its journal line
    ("journal", 7, True),  # every shard journaled, finalization not started
    *[("fsync", n, False) for n in (3, 20, 31)],
    *[("unlink", n, False) for n in (1, 2, 3)],  # during finish(), after the manifest
]


@pytest.mark.parametrize(
    "target,n,after", KILL_POINTS, ids=[f"{t}-{'after' if a else 'before'}-{n}" for t, n, a in KILL_POINTS]
)
def test_sigkill_at_kill_point_then_rerun_is_byte_identical_to_uninterrupted_run(model, tmp_path, target, n, after):
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    assert_killed(killed_at(plan, target, n, after))
    assert_no_incomplete_shard(out, model["reference"])
    assert_resumes_to_reference(plan, out, model["reference"], f"killed {'after' if after else 'before'} {target} #{n}")


def test_repeated_sigkills_then_rerun_is_byte_identical(model, tmp_path):
    """Killed again and again while resuming, each time a little further on (each kill point is counted
    from the start of that run, so all five are reached): still the same bytes."""
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    for target, n in [("pwrite", 10), ("journal", 2), ("pwrite", 40), ("replace", 3), ("journal", 1)]:
        assert_killed(killed_at(plan, target, n))
        assert_no_incomplete_shard(out, model["reference"])
    assert_resumes_to_reference(plan, out, model["reference"], "after five successive kills")


# -- real subprocesses: SIGINT, SIGTERM and an external SIGKILL of `python -m shardmerge` --------------------
# The wrapper is `python -m shardmerge PLAN -q` (run through runpy, exactly as -m does) with a hook on the
# N-th tile write (or rename) that sends the signal to the process itself (SIGINT/SIGTERM), or for SIGKILL
# writes a marker and stalls so that the test kills it from outside at a known point.
WRAPPER = r"""
import os, runpy, signal, sys, threading, time
import shardmerge.stores.local as ex
sig, at, marker = int(os.environ["SM_SIGNAL"]), int(os.environ["SM_AT"]), os.environ["SM_MARKER"]
obj, attr = (os, "replace") if os.environ["SM_TARGET"] == "replace" else (ex, "pwrite_all")
real, lock, count = getattr(obj, attr), threading.Lock(), [0]
def hook(*args, **kwargs):
    with lock:
        count[0] += 1
        hit = count[0] == at
    if hit:
        if sig == signal.SIGKILL:
            open(marker, "w").close()
            time.sleep(60)
        else:
            os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
setattr(obj, attr, hook)
sys.argv = ["shardmerge"] + sys.argv[1:]
runpy.run_module("shardmerge", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def signalled_runs(model, tmp_path_factory):
    """Four `python -m shardmerge` subprocesses, started together to share the interpreter start-up time:
    one sends itself SIGINT, one SIGTERM, one is SIGKILLed from here, each mid-write; and one sends itself
    SIGTERM during finalization (at the 10th rename: a copied config file, after every shard is in)."""
    runs = {}
    for key, sig, target, at in (
        ("SIGINT", signal.SIGINT, "pwrite", 30),
        ("SIGTERM", signal.SIGTERM, "pwrite", 55),
        ("SIGKILL", signal.SIGKILL, "pwrite", 80),
        ("SIGTERM-finalizing", signal.SIGTERM, "replace", 10),
    ):
        d = tmp_path_factory.mktemp(key)
        plan = make_plan(model, d)
        env = dict(
            os.environ,
            SM_SIGNAL=str(int(sig)),
            SM_AT=str(at),
            SM_MARKER=str(d / "marker"),
            SM_TARGET=target,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(plan), "-q"],
            env=env,
            cwd=d,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[key] = {"proc": proc, "plan": plan, "out": d / "out", "marker": d / "marker"}
    killer = runs["SIGKILL"]
    deadline = time.monotonic() + 120
    while not killer["marker"].exists() and killer["proc"].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killer["marker"].exists(), "the SIGKILL subprocess never reached its kill point"
    os.kill(killer["proc"].pid, signal.SIGKILL)
    for run in runs.values():
        stdout, stderr = run["proc"].communicate(timeout=120)
        run["rc"], run["stderr"] = run["proc"].returncode, stderr
    return runs


@pytest.mark.parametrize("key,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGTERM-finalizing", 143)])
def test_signal_mid_run_exits_128_plus_signum_with_one_line_and_no_traceback(signalled_runs, key, code):
    run = signalled_runs[key]
    assert run["rc"] == code, f"exit status {run['rc']}, stderr: {run['stderr']!r}"
    line = one_error_line(run["stderr"])
    assert key.split("-")[0] in line and "resum" in line
    assert not (run["out"] / models.MANIFEST_NAME).exists()
    assert not (run["out"] / models.INDEX_NAME).exists()


@pytest.mark.parametrize("key", ["SIGINT", "SIGTERM", "SIGTERM-finalizing"])
def test_signal_mid_run_leaves_output_resumable_to_identical_bytes(model, signalled_runs, key):
    run = signalled_runs[key]
    assert (run["out"] / models.STATE_DIR / "state.json").is_file(), "the interrupted run left no resumable state"
    assert not (run["out"] / models.MANIFEST_NAME).exists()
    assert_no_incomplete_shard(run["out"], model["reference"])
    assert_resumes_to_reference(run["plan"], run["out"], model["reference"], f"after {key}")


def test_external_sigkill_of_python_m_shardmerge_resumes_to_identical_bytes(model, signalled_runs):
    run = signalled_runs["SIGKILL"]
    assert run["rc"] == -signal.SIGKILL
    assert not (run["out"] / models.MANIFEST_NAME).exists()
    assert_no_incomplete_shard(run["out"], model["reference"])
    assert_resumes_to_reference(run["plan"], run["out"], model["reference"], "after an external SIGKILL")


# -- a different plan over an existing output ----------------------------------------------------------------
@pytest.fixture(scope="module")
def half_weight_reference(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("half")
    plan = make_plan(model, d, weight=0.5)
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    reference = models.tree_bytes(d / "out")
    assert reference != model["reference"]
    return reference


def _partial_output(model, tmp_path) -> Path:
    plan = make_plan(model, tmp_path)
    assert_killed(killed_at(plan, "pwrite", 50))
    return tmp_path / "out"


def _finished_output(model, tmp_path) -> Path:
    result = run_cli(make_plan(model, tmp_path), "-q")
    assert result.returncode == 0, result.stderr
    return tmp_path / "out"


@pytest.mark.parametrize("existing", [_partial_output, _finished_output], ids=["partial", "finished"])
def test_changed_plan_over_existing_output_is_refused_naming_the_directory(model, tmp_path, existing):
    out = existing(model, tmp_path)
    before = models.tree_bytes(out)
    plan = make_plan(model, tmp_path, "changed.yaml", weight=0.5)
    result = run_cli(plan, "-q")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert str(out) in line and "overwrite" in line
    assert models.tree_bytes(out) == before, "a refused run changed the output directory"


@pytest.mark.parametrize("existing", [_partial_output, _finished_output], ids=["partial", "finished"])
def test_changed_plan_with_overwrite_replaces_output_with_the_new_plans_bytes(
    model, tmp_path, half_weight_reference, existing
):
    out = existing(model, tmp_path)
    plan = make_plan(model, tmp_path, "changed.yaml", weight=0.5, overwrite=True)
    result = run_cli(plan, "-q")
    assert result.returncode == 0, result.stderr
    models.assert_same_tree(out, half_weight_reference, "overwrite with weight 0.5")


def test_foreign_files_in_output_are_refused_without_overwrite(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli(make_plan(model, tmp_path), "-q")
    assert result.returncode != 0
    assert str(out) in one_error_line(result.stderr)
    assert models.tree_listing(out) == ["notes.txt"]


# -- the lock --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def concurrent_run(plan: Path, at: int = 2):
    """A real first run of `plan`, forked and stalled in its `at`-th journal append (mid-run, holding whatever
    lock shardmerge takes) for as long as the block lasts; SIGKILLed afterwards. While it stalls, no shard is
    renamed or journaled; only its half-written .partial files under .shardmerge/tmp may still grow."""
    r, w = os.pipe()

    def stall():
        os.write(w, b"x")
        time.sleep(300)

    pid = fork_cli(plan, "-q", patch=(journal_mod.OutputState, "journal", lambda real: at_call(real, at, stall)))
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        assert ready and os.read(r, 1) == b"x", "the concurrent run never reached its stall point"
        yield pid
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def settled(out: Path) -> dict[str, bytes]:
    """The output as another run may rely on it: everything but the stalled run's in-flight .partial files."""
    return {k: v for k, v in models.tree_bytes(out).items() if not k.startswith(f"{models.STATE_DIR}/tmp/")}


def test_second_concurrent_run_on_same_output_is_refused_naming_the_directory(model, tmp_path):
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    with concurrent_run(plan):
        before = settled(out)
        result = run_cli(plan, "-q")
        after = settled(out)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert str(out) in line and "another shardmerge run" in line
    assert after == before, "the refused run changed the output"
    assert_resumes_to_reference(plan, out, model["reference"], "after the first run was killed")


def test_overwrite_run_is_refused_while_another_run_is_writing(model, tmp_path):
    """overwrite: true must not clear a directory another run is writing: the lock comes first."""
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    changed = make_plan(model, tmp_path, "changed.yaml", weight=0.5, overwrite=True)
    with concurrent_run(plan):
        before = settled(out)
        result = run_cli(changed, "-q")
        after = settled(out)
    assert result.returncode != 0, "a second run cleared and wrote a directory another run was writing"
    assert "another shardmerge run" in one_error_line(result.stderr)
    assert after == before, "the overwrite run deleted the files of the run holding the lock"


# -- a full disk --------------------------------------------------------------------------------------------
def no_space_left():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "attr,n",
    [("pwrite_all", 1), ("pwrite_all", 45), ("copy_range", 6)],
    ids=["first-header-write", "tile-write", "kernel-copy"],
)
def test_enospc_fails_cleanly_naming_the_shard_and_rerun_resumes_identically(model, tmp_path, monkeypatch, attr, n):
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(local_mod, attr, at_call(getattr(local_mod, attr), n, no_space_left))
    with pytest.raises(shardmerge.ShardmergeError) as failure:
        shardmerge.merge(str(plan))
    message = str(failure.value)
    assert "no space left on device" in message
    assert any(models.shard_name(i) in message for i in range(models.TINY.shards)), message
    assert "\n" not in message
    assert not (out / models.MANIFEST_NAME).exists()
    assert not (out / models.INDEX_NAME).exists()
    assert not list(out.rglob("*.partial")), "a failed run left partial shards holding the disk"
    assert_no_incomplete_shard(out, model["reference"])
    monkeypatch.undo()
    assert_resumes_to_reference(plan, out, model["reference"], "after ENOSPC")


def test_enospc_through_cli_is_one_error_line(model, tmp_path, monkeypatch):
    plan = make_plan(model, tmp_path)
    monkeypatch.setattr(local_mod, "pwrite_all", at_call(local_mod.pwrite_all, 30, no_space_left))
    result = run_cli(plan, "-q")
    assert result.returncode == 1
    assert "no space left on device" in one_error_line(result.stderr)


def test_enospc_while_writing_the_index_is_one_error_line_and_resumable(model, tmp_path, monkeypatch):
    """The disk can also fill up during finalization (copied config files, index, manifest)."""
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    real = local_mod.atomic_write

    def atomic_write(path, data):
        if Path(path).name == models.INDEX_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(local_mod, "atomic_write", atomic_write)
    try:
        result = run_cli(plan, "-q")
    except OSError as e:
        pytest.fail(f"a raw OSError escaped the CLI (the user sees a traceback): {e!r}")
    assert result.returncode == 1
    assert "no space left on device" in one_error_line(result.stderr)
    assert not (out / models.MANIFEST_NAME).exists()
    monkeypatch.undo()
    assert_resumes_to_reference(plan, out, model["reference"], "after ENOSPC on the index")


# -- a damaged partial output ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["deleted", "flipped", "truncated"])
def test_journaled_shard_damaged_before_resume_is_redone(model, tmp_path, damage):
    plan = make_plan(model, tmp_path)
    out = tmp_path / "out"
    assert_killed(killed_at(plan, "journal", 4, after=True))
    shard = out / models.shard_name(1)
    data = bytearray(shard.read_bytes())
    if damage == "deleted":
        shard.unlink()
    elif damage == "flipped":
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes(bytes(data[:-8]))
    assert_resumes_to_reference(plan, out, model["reference"], f"journaled shard {damage}")


# -- a shard published (renamed to its final name) but not journaled when the run was killed -------------------
def _published_not_journaled(plan: Path, out: Path) -> Path:
    """Kill `plan`'s run between its first shard's rename and that shard's journal line; returns the shard."""
    assert_killed(killed_at(plan, "journal", 1))
    published = list(out.glob("*.safetensors"))
    assert len(published) == 1, published
    return published[0]


def test_shard_published_but_not_journaled_is_adopted_by_the_resume_not_written_again(model, tmp_path):
    plan, out = make_plan(model, tmp_path), tmp_path / "out"
    shard = _published_not_journaled(plan, out)
    inode = shard.stat().st_ino
    report = shardmerge.merge(plan)
    shards = len([name for name in model["reference"] if name.endswith(".safetensors")])
    assert (report.shards_resumed, report.shards_written) == (1, shards - 1)
    assert shard.stat().st_ino == inode, "the adopted shard was written again"
    models.assert_same_tree(out, model["reference"], "after adopting an unjournaled shard")


@pytest.mark.parametrize("doubt", ["untagged", "another-tag", "changed-since"])
def test_unjournaled_shard_whose_identity_is_not_proven_is_written_again(model, tmp_path, doubt):
    plan, out = make_plan(model, tmp_path), tmp_path / "out"
    shard = _published_not_journaled(plan, out)
    kept = json.loads(os.getxattr(shard, "user.shardmerge"))
    if doubt == "untagged":
        os.removexattr(shard, "user.shardmerge")
    elif doubt == "another-tag":  # another plan's shard, or this one's made from other versions of the inputs
        os.setxattr(shard, "user.shardmerge", json.dumps({**kept, "tag": "0" * 32}).encode())
    else:
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
    inode = shard.stat().st_ino
    assert_resumes_to_reference(plan, out, model["reference"], f"unjournaled shard {doubt}")
    assert shard.stat().st_ino != inode, "a shard of unproven identity was adopted"


def test_unjournaled_shard_made_from_an_input_that_changed_since_is_written_again(model, tmp_path):
    """The tag names the versions of the inputs a shard was made from: a base re-saved with other values under
    the same header makes the published shard another plan's, redone from the new base."""
    base = shutil.copytree(model["base"], tmp_path / "base")
    plan = write_plan(
        tmp_path / "plan.yaml", base=base, adapters=[model["adapter"]], output=tmp_path / "out", **models.TINY_OPTIONS
    )
    shard = _published_not_journaled(plan, tmp_path / "out")
    models.write_tiny_base(base, seed=5)
    fresh = write_plan(
        tmp_path / "fresh.yaml",
        base=base,
        adapters=[model["adapter"]],
        output=tmp_path / "fresh",
        **models.TINY_OPTIONS,
    )
    assert run_cli(fresh, "-q").returncode == 0
    inode = shard.stat().st_ino
    assert run_cli(plan, "-q").returncode == 0
    assert shard.stat().st_ino != inode, "a shard made from the old base was adopted"
    models.assert_same_tree(tmp_path / "out", models.tree_bytes(tmp_path / "fresh"), "after the base changed")


# -- inputs are never touched, even by failed runs --------------------------------------------------------------
def test_failed_run_with_a_bad_adapter_touches_no_input_and_writes_no_output(model, tmp_path):
    from safetensors.torch import load_file

    config = json.loads((model["adapter"] / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "nope"]  # a targeted module the base lacks (untargeted ones are ignored)
    tensors = load_file(str(model["adapter"] / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = tensors.popitem()[1]
    bad = write_adapter(tmp_path / "bad-adapter", tensors, **config)
    before = models.tree_hashes(bad)
    plan = make_plan(model, tmp_path, adapter=bad)
    result = run_cli(plan, "-q")
    assert result.returncode != 0
    one_error_line(result.stderr)
    assert models.tree_hashes(bad) == before
    assert not (tmp_path / "out").exists()


def test_truncated_adapter_file_fails_without_touching_inputs(model, tmp_path):
    bad = tmp_path / "bad-adapter"
    shutil.copytree(model["adapter"], bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = models.tree_hashes(bad)
    result = run_cli(make_plan(model, tmp_path, adapter=bad), "-q")
    assert result.returncode != 0
    assert "adapter_model.safetensors" in one_error_line(result.stderr)
    assert models.tree_hashes(bad) == before
    assert not (tmp_path / "out").exists()


# -- the output may not overlap an input ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inside-base", "the-adapter-dir", "contains-base"])
def test_output_overlapping_an_input_is_refused_and_nothing_is_written(model, tmp_path, where):
    output = {
        "inside-base": model["base"] / "merged",
        "the-adapter-dir": model["adapter"],
        "contains-base": model["root"],
    }[where]
    watched = model["root"]
    before = models.tree_listing(watched)
    result = run_cli(make_plan(model, tmp_path, output=output), "-q")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert str(output) in line and "overlap" in line
    assert models.tree_listing(watched) == before, "a refused run created files"
    assert not list(tmp_path.glob("out*"))


# -- re-running a finished output ---------------------------------------------------------------------------
def test_rerun_over_finished_output_exits_0_reports_complete_and_rewrites_nothing(model, tmp_path):
    plan = make_plan(model, tmp_path)
    out = _finished_output(model, tmp_path)
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}
    result = run_cli(plan)  # not quiet: the summary says what happened
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")} == stamps
    models.assert_same_tree(out, model["reference"])


@pytest.mark.parametrize("damage", ["flipped-shard-byte", "deleted-config"])
def test_rerun_over_damaged_finished_output_repairs_it(model, tmp_path, damage):
    """A finished output that no longer matches its manifest (a shard changed, a copied file gone) is checked
    on re-run (runner.claim) and repaired, not crashed on."""
    plan = make_plan(model, tmp_path)
    out = _finished_output(model, tmp_path)
    if damage == "deleted-config":
        (out / "config.json").unlink()
    else:
        shard = out / models.shard_name(2)
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    try:
        result = run_cli(plan, "-q")
    except OSError as e:
        pytest.fail(f"a raw OSError escaped the CLI (the user sees a traceback): {e!r}")
    assert result.returncode == 0, result.stderr
    models.assert_same_tree(out, model["reference"], f"repaired finished output ({damage})")
