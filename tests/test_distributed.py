"""Scale-out: the same merge on 1, 2 and 3 ranks writes the same bytes; a dead rank fails the job cleanly and a
re-run with another number of ranks resumes; the launcher recipes in configs/ work.

Multi-process runs are launched the ways users launch them: torchrun, accelerate launch, Slurm's srun (a stand-in
`srun`/`scontrol` on PATH runs the real batch script on this machine), and plain RANK/WORLD_SIZE/MASTER_* env.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.adapters import lora_pair, write_adapter
from helpers.models import assert_same_tree, tree_bytes, write_model
from helpers.plans import write_plan

import shardmerge
from shardmerge.demo import write_demo
from shardmerge.distributed import Group, Topology, assign, describe_assignment, topology
from shardmerge.errors import ShardmergeError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BIN = Path(sys.executable).parent
TIMEOUT = "20"  # SHARDMERGE_DIST_TIMEOUT in the launched jobs: a dead rank is noticed within this
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SHARDMERGE_DIST_TIMEOUT",
)
TIMINGS: dict[str, float] = {}


# -- inputs -------------------------------------------------------------------------------------------------
def _seven_shard_model(tmp: Path) -> tuple[Path, Path]:
    """Seven shards of different sizes (so the byte balancing matters), an adapter on two projections."""
    g = torch.Generator().manual_seed(7)
    tensors, adapter = {}, {}
    for i in range(5):
        width = 16 + 8 * i
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(width, 32, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * width, 32, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(32, dtype=torch.bfloat16)
        adapter.update(lora_pair(f"model.layers.{i}.self_attn.q_proj", width, 32, seed=i))
        adapter.update(lora_pair(f"model.layers.{i}.mlp.up_proj", 2 * width, 32, seed=10 + i))
    tensors["model.embed_tokens.weight"] = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    base = write_model(tmp / "base", tensors, shards=7, config={"model_type": "llama", "hidden_size": 32})
    return base, write_adapter(tmp / "adapter", adapter, target_modules=["q_proj", "up_proj"])


def _single_shard_model(tmp: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
    }
    base = write_model(tmp / "base", tensors, shards=1)
    return base, write_adapter(tmp / "adapter", lora_pair("model.layers.0.self_attn.q_proj", 32, 32))


def _plan(path: Path, base: Path, adapter: Path, output: Path) -> Path:
    return write_plan(path, base=base, adapters=[{"path": adapter}], output=output, device="cpu", max_memory="64MiB")


def _reference(tmp: Path, base: Path, adapter: Path, monkeypatch) -> dict[str, bytes]:
    """The one-process merge, in this process, with no launcher variables around."""
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var, raising=False)
    out = tmp / "reference"
    shardmerge.merge(_plan(tmp / "reference.yaml", base, adapter, out))
    return tree_bytes(out)


# -- launching ------------------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
    }
    env.update(
        SHARDMERGE_DIST_TIMEOUT=TIMEOUT,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(
    n: int, argv_for_rank, env: dict[str, str] | None = None, timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """n processes with the variables torchrun would set, each with its own argv; all outcomes."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        rank_env = dict(
            env or _env(),
            RANK=str(rank),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                argv_for_rank(rank), env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _timed(label: str, fn):
    start = time.monotonic()
    result = fn()
    TIMINGS[label] = time.monotonic() - start
    print(f"\n[timing] {label}: {TIMINGS[label]:.1f}s", file=sys.stderr)
    return result


def _shardmerge(*args) -> list[str]:
    return [sys.executable, "-m", "shardmerge", *map(str, args)]


# -- assign -----------------------------------------------------------------------------------------------
def test_assign_balances_bytes_largest_first_and_is_deterministic():
    sizes = {"a": 100, "b": 90, "c": 60, "d": 50, "e": 40, "f": 10}
    owned = assign(sizes, 2)
    # a→0; b→1; c→1 (90 < 100); d→0 (150 = 150: tie, lower rank); e→0 (150 = 150 again); f→1 (150 < 190)
    assert owned == [["a", "d", "e"], ["b", "c", "f"]]
    loads = [sum(sizes[n] for n in names) for names in owned]
    assert abs(loads[0] - loads[1]) <= max(sizes.values())
    assert assign(dict(reversed(list(sizes.items()))), 2) == owned  # input order does not matter


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 13])
def test_assign_is_a_disjoint_cover(world):
    sizes = {f"model-{i:05d}-of-00011.safetensors": (i * 7919) % 1000 + 1 for i in range(11)}
    owned = assign(sizes, world)
    assert len(owned) == world
    flat = [n for names in owned for n in names]
    assert sorted(flat) == sorted(sizes) and len(flat) == len(set(flat))
    assert all(names == sorted(names) for names in owned)
    loads = sorted(sum(sizes[n] for n in names) for names in owned)
    if world <= len(sizes):
        assert all(names for names in owned)
        assert loads[-1] - loads[0] <= max(sizes.values())  # greedy LPT: within one shard of balanced
    else:
        assert sum(1 for names in owned if not names) == world - len(sizes)  # idle ranks, one shard each else
        assert all(len(names) <= 1 for names in owned)


def test_assign_equal_sizes_round_robin_and_ties_by_name():
    sizes = {name: 10 for name in "edcba"}
    assert assign(sizes, 2) == [["a", "c", "e"], ["b", "d"]]
    assert assign({}, 3) == [[], [], []]
    with pytest.raises(ValueError):
        assign(sizes, 0)


def test_describe_assignment_names_idle_ranks():
    text = describe_assignment({"x.safetensors": 2**20}, 2)
    assert "rank 0: 1 shard(s), 1.0MiB: x.safetensors" in text and "rank 1: 0 shard(s)" in text and "idle" in text


# -- topology ---------------------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for var in [*_LAUNCH_VARS, *[v for v in os.environ if v.startswith("SLURM_")]]:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_topology_single_process_by_default(clean_env):
    assert topology() == Topology(0, 1, 0)


def test_topology_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert topology() == Topology(5, 8, 1)


def test_topology_srun_variables(clean_env):
    for var, value in {
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "42",
    }.items():
        clean_env.setenv(var, value)
    assert topology() == Topology(3, 4, 0)


def test_topology_torchrun_inside_srun_uses_torchrun_ranks(clean_env):
    for var, value in {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "0",
        "RANK": "6",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "2",
    }.items():
        clean_env.setenv(var, value)
    assert topology() == Topology(6, 8, 2)


def test_topology_batch_script_without_srun_is_one_process(clean_env):
    # The batch script itself (no srun) carries SLURM_NTASKS and SLURM_PROCID=0 but is a single process.
    for var, value in {
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "4",
    }.items():
        clean_env.setenv(var, value)
    assert topology() == Topology(0, 1, 0)


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "not integers"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 WORLD_SIZE=2"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS=0"),
    ],
)
def test_topology_rejects_nonsense(clean_env, env, needle):
    for var, value in env.items():
        clean_env.setenv(var, value)
    with pytest.raises(ShardmergeError, match=needle):
        topology()


# -- the control group, in threads (fast) ---------------------------------------------------------------------
def _groups(monkeypatch, world: int, timeout: str = "2") -> list[Group]:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("SHARDMERGE_DIST_TIMEOUT", timeout)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    groups: list = [None] * world
    errors: list = []

    def join(rank):
        try:
            groups[rank] = Group(Topology(rank, world, rank))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return groups


def _in_threads(fn, world: int) -> list:
    results: list = [None] * world

    def call(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001
            results[rank] = e

    threads = [threading.Thread(target=call, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_group_gathers_every_ranks_value_in_rank_order(monkeypatch):
    groups = _groups(monkeypatch, 3)
    try:
        got = _in_threads(lambda r: groups[r].gather({"rank": r, "shards": ["x"] * r}), 3)
        assert got == [[{"rank": r, "shards": ["x"] * r} for r in range(3)]] * 3
    finally:
        _in_threads(lambda r: groups[r].close(), 3)


def test_group_names_a_rank_that_went_silent(monkeypatch):
    groups = _groups(monkeypatch, 2, timeout="1")
    groups[1]._stop.set()  # rank 1's heartbeat stops without it leaving: as if SIGKILLed or its node died
    start = time.monotonic()
    with pytest.raises(ShardmergeError, match=r"rank 1 of 2 stopped responding \(no heartbeat for 1s"):
        groups[0].gather("done")
    assert time.monotonic() - start < 10
    groups[0].close()


def test_group_waits_for_a_slow_rank_that_is_alive(monkeypatch):
    groups = _groups(monkeypatch, 2, timeout="1")

    def step(rank):
        if rank == 1:
            time.sleep(3)  # three timeouts long, but its heartbeat keeps going
        return groups[rank].gather(rank)

    try:
        assert _in_threads(step, 2) == [[0, 1], [0, 1]]
    finally:
        _in_threads(lambda r: groups[r].close(), 2)


def test_group_stops_waiting_for_a_rank_that_left(monkeypatch):
    groups = _groups(monkeypatch, 2, timeout="30")
    groups[1].close()  # rank 1 failed outside a gather and left
    start = time.monotonic()
    with pytest.raises(ShardmergeError, match="rank 1 of 2 stopped early"):
        groups[0].gather("done")
    assert time.monotonic() - start < 5  # not the 30 s timeout
    groups[0].close()


def test_group_rank_that_never_joins(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("SHARDMERGE_DIST_TIMEOUT", "1")
    with pytest.raises(ShardmergeError, match=r"rank 0 of 2: could not join the other ranks at 127\.0\.0\.1:\d+"):
        Group(Topology(0, 2, 0))


def test_group_needs_master_addr(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ShardmergeError, match="MASTER_ADDR/MASTER_PORT are not set"):
        Group(Topology(1, 2, 0))
    assert not Group(Topology(0, 1, 0)).active


# -- real multi-process merges --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seven")
    base, adapter = _seven_shard_model(tmp)
    return tmp, base, adapter


@pytest.mark.slow
def test_torchrun_three_ranks_equals_one_process(seven, monkeypatch):
    tmp, base, adapter = seven
    expected = _reference(tmp, base, adapter, monkeypatch)
    plan = _plan(tmp / "three.yaml", base, adapter, tmp / "three")
    result = _timed(
        "torchrun 3 ranks, 7 shards",
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "3",
                "-m",
                "shardmerge",
                str(plan),
                "-q",
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_tree(tmp / "three", expected, "torchrun x3")


@pytest.mark.slow
def test_more_ranks_than_shards_single_shard_model(tmp_path, monkeypatch):
    base, adapter = _single_shard_model(tmp_path)
    expected = _reference(tmp_path, base, adapter, monkeypatch)
    assert "model.safetensors" in expected and "model.safetensors.index.json" not in expected
    plan = _plan(tmp_path / "two.yaml", base, adapter, tmp_path / "two")
    results = _timed(
        "2 ranks (env), 1 shard",
        lambda: _spawn(2, lambda r: _shardmerge(plan, "-q", "--report-json", tmp_path / f"report-r{r}.json")),
    )
    for r, result in enumerate(results):
        assert result.returncode == 0, f"rank {r}: {result.stderr[-3000:]}"
    assert_same_tree(tmp_path / "two", expected, "2 ranks, 1 shard")
    report = yaml.safe_load((tmp_path / "report-r0.json").read_text())  # gathered from every rank
    assert report["ranks"] == 2 and report["shards_written"] == 1 and report["tensors_merged"] == 1


_KILLER = textwrap.dedent("""
    # Rank KILL_RANK SIGKILLs itself as it starts its second shard, once its first is journaled: a rank lost
    # mid-run, after some of its work is durable. Then runs the real CLI.
    import os, signal, sys, time
    from pathlib import Path

    import shardmerge.stores.local as local
    from shardmerge.cli import main

    if os.environ.get("RANK") == os.environ["KILL_RANK"]:
        real, headers = local.pwrite_all, []
        journal = Path(os.environ["KILL_OUTPUT"]) / ".shardmerge" / f"journal-r{os.environ['RANK']}.jsonl"

        def pwrite_all(fd, buffer, offset):
            if offset == 0:  # a shard's header: the first write of each shard
                headers.append(fd)
                if len(headers) == 2:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and not (journal.is_file() and journal.read_text().strip()):
                        time.sleep(0.01)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(fd, buffer, offset)

        local.pwrite_all = pwrite_all
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_rank_fails_the_job_and_a_rerun_with_other_ranks_resumes(seven, tmp_path, monkeypatch):
    tmp, base, adapter = seven
    expected = _reference(tmp_path, base, adapter, monkeypatch)
    out = tmp_path / "out"
    plan = _plan(tmp_path / "plan.yaml", base, adapter, out)
    killer = tmp_path / "killer.py"
    killer.write_text(_KILLER)
    env = _env(KILL_RANK="1", KILL_OUTPUT=str(out), SHARDMERGE_DIST_TIMEOUT="2")
    results = _timed(
        "2 ranks (env), rank 1 killed",
        lambda: _spawn(2, lambda r: [sys.executable, str(killer), str(plan), "-q"], env=env),
    )
    rank0, rank1 = results
    assert rank1.returncode == -signal.SIGKILL, rank1.stderr[-2000:]
    assert rank0.returncode != 0
    assert "Traceback" not in rank0.stderr, rank0.stderr
    lines = rank0.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank 1 of 2 stopped responding" in lines[0], rank0.stderr
    assert not (out / "shardmerge-manifest.json").exists() and not (out / "model.safetensors.index.json").exists()
    journals = {p.name: p.read_text().splitlines() for p in (out / ".shardmerge").glob("journal-r*.jsonl")}
    assert len(journals.get("journal-r1.jsonl", [])) == 1, journals  # its first shard is durable

    # Re-run with three ranks: resumes (the killed rank's finished shard is kept), same bytes as one process.
    results = _timed(
        "3 ranks (env), resume",
        lambda: _spawn(3, lambda r: _shardmerge(plan, "-q", "--report-json", tmp_path / f"report-r{r}.json")),
    )
    for r, result in enumerate(results):
        assert result.returncode == 0, f"rank {r}: {result.stderr[-3000:]}"
    assert_same_tree(out, expected, "resumed with 3 ranks")
    report = yaml.safe_load((tmp_path / "report-r0.json").read_text())
    done_before = sum(len(lines) for lines in journals.values())
    assert report["shards_resumed"] == done_before >= 1 and report["shards_written"] == 7 - done_before


@pytest.mark.slow
def test_a_rank_that_cannot_plan_fails_every_rank_naming_it(tmp_path):
    """Rank 1 cannot see the base (say its node lacks the shared mount): both ranks fail at once, naming it."""
    base, adapter = _single_shard_model(tmp_path)
    good = _plan(tmp_path / "good.yaml", base, adapter, tmp_path / "out")
    bad = _plan(tmp_path / "bad.yaml", tmp_path / "not-mounted", adapter, tmp_path / "out")
    start = time.monotonic()
    results = _spawn(2, lambda r: _shardmerge(good if r == 0 else bad, "-q"))
    assert time.monotonic() - start < float(TIMEOUT)  # reported, not noticed by a timeout
    for result in results:
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert "not-mounted" in result.stderr
    assert "rank 1 of 2 failed" in results[0].stderr
    assert not (tmp_path / "out" / "shardmerge-manifest.json").exists()


@pytest.mark.slow
def test_ranks_given_different_outputs_are_refused_before_any_shard_is_written(tmp_path):
    """Each rank's plan names its own output (say a per-node path): refused at once, not a manifest over half."""
    base, adapter = _seven_shard_model(tmp_path)
    plans = [_plan(tmp_path / f"r{r}.yaml", base, adapter, tmp_path / f"out{r}") for r in range(2)]
    results = _spawn(2, lambda r: _shardmerge(plans[r], "-q"))
    for result in results:
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert "rank 1 of 2 writes to" in lines[0] and str(tmp_path / "out1") in lines[0], lines[0]
    assert not list(tmp_path.glob("out*/*.safetensors")) and not list(tmp_path.glob("out*/shardmerge-manifest.json"))


_ELSEWHERE = textwrap.dedent("""
    # Rank 1 writes to a disk rank 0 cannot see (a node-local path on another node): each shard it commits
    # moves out of rank 0's view of the output. Then runs the real CLI.
    import os, sys
    from pathlib import Path

    import shardmerge.executor as executor
    from shardmerge.cli import main

    if os.environ["RANK"] == "1":
        real, elsewhere = executor.commit_shard, Path(os.environ["ELSEWHERE"])

        def commit_shard(state, rank, name, *args, **kwargs):
            record = real(state, rank, name, *args, **kwargs)
            elsewhere.mkdir(exist_ok=True)
            os.rename(state.directory / name, elsewhere / name)
            return record

        executor.commit_shard = commit_shard
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_shard_rank_0_cannot_see_fails_the_job_naming_it_with_no_manifest(tmp_path):
    base, adapter = _seven_shard_model(tmp_path)
    out = tmp_path / "out"
    plan = _plan(tmp_path / "plan.yaml", base, adapter, out)
    wrapper = tmp_path / "elsewhere.py"
    wrapper.write_text(_ELSEWHERE)
    env = _env(ELSEWHERE=str(tmp_path / "node1"))
    rank0, rank1 = _spawn(2, lambda r: [sys.executable, str(wrapper), str(plan), "-q"], env=env)
    moved = sorted(p.name for p in (tmp_path / "node1").iterdir())
    lines = rank0.stderr.strip().splitlines()
    assert rank0.returncode != 0 and rank1.returncode != 0 and len(lines) == 1, rank0.stderr
    assert any(str(out / name) in lines[0] for name in moved) and "rank 1 of 2 wrote" in lines[0], lines[0]
    assert "Traceback" not in rank1.stderr, rank1.stderr
    assert not (out / "shardmerge-manifest.json").exists() and not (out / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_torchrun_reports_the_killed_rank(tmp_path, monkeypatch):
    """Under torchrun the launcher sees the dead worker first: the job exits non-zero naming it, nothing final."""
    base, adapter = _seven_shard_model(tmp_path)
    out = tmp_path / "out"
    plan = _plan(tmp_path / "plan.yaml", base, adapter, out)
    killer = tmp_path / "killer.py"
    killer.write_text(_KILLER)
    result = _timed(
        "torchrun 2 ranks, rank 1 killed",
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(killer),
                str(plan),
                "-q",
            ],
            env=_env(KILL_RANK="1", KILL_OUTPUT=str(out), SHARDMERGE_DIST_TIMEOUT="3"),
            capture_output=True,
            text=True,
            timeout=180,
        ),
    )
    assert result.returncode != 0
    root_cause = result.stderr.partition("Root Cause (first observed failure)")[2]  # torchrun's failure summary
    assert re.search(r"rank\s*:\s*1\b", root_cause) and "SIGKILL" in root_cause, result.stderr[-3000:]
    assert not (out / "shardmerge-manifest.json").exists() and not (out / "model.safetensors.index.json").exists()


# -- the recipes in configs/ ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    write_demo(tmp)
    return tmp


def _demo_plan(demo: Path, name: str) -> Path:
    return _plan(demo / f"{name}.yaml", demo / "base", demo / "adapter", demo / name)


@pytest.mark.slow
def test_torchrun_recipe_dry_run(demo):
    script = CONFIGS / "torchrun.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    plan = _demo_plan(demo, "torchrun")
    result = _timed(
        "configs/torchrun.sh 2 ranks --dry-run",
        lambda: subprocess.run(
            ["bash", str(script), str(plan), "--dry-run"],
            env=_env(NPROC="2"),
            capture_output=True,
            text=True,
            timeout=180,
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensors: 28 merged" in result.stdout
    assert not (demo / "torchrun").exists()
    assert result.stdout.count("tensors: 28 merged") == 1  # rank 0 prints; the others only check
    assert "ranks: 2" in result.stdout and "rank 0: " in result.stdout and "rank 1: " in result.stdout


def _accelerate_config() -> dict:
    return yaml.safe_load((CONFIGS / "accelerate-config.yaml").read_text())


def test_accelerate_config_parses():
    config = _accelerate_config()
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["distributed_type"] == "MULTI_GPU"
    assert config["num_machines"] >= 1 and config["num_processes"] >= 1
    readme = (CONFIGS / "README.md").read_text()
    assert "accelerate launch --config_file configs/accelerate-config.yaml -m shardmerge" in readme


@pytest.mark.slow
def test_accelerate_launch_recipe_dry_run(demo):
    plan = _demo_plan(demo, "accelerate")
    result = _timed(
        "accelerate launch 2 ranks --dry-run",
        lambda: subprocess.run(
            [
                str(BIN / "accelerate"),
                "launch",
                "--config_file",
                str(CONFIGS / "accelerate-config.yaml"),
                "--num_processes",
                "2",
                "-m",
                "shardmerge",
                str(plan),
                "--dry-run",
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensors: 28 merged" in result.stdout
    assert not (demo / "accelerate").exists()


_FAKE_SCONTROL = """#!/usr/bin/env bash
# stand-in for `scontrol show hostnames NODELIST`: every "node" is this machine
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unexpected $*" >&2; exit 2; }
echo 127.0.0.1
sleep 0.2  # a long node list: head has exited by the time the rest is written (SIGPIPE)
for i in $(seq 2 2000); do echo "node-$i"; done
"""
_FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for `srun` with one task per node: starts SLURM_NNODES local tasks with the variables srun sets
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do echo "$1" >> "$SRUN_LOG"; shift; done
n=${SLURM_NNODES:?}; pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=$n SLURM_NODEID=$i SLURM_STEP_ID=0 "$@" & pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_slurm_batch_script_runs_two_ranks_and_matches_one_process(demo, tmp_path, monkeypatch):
    script = CONFIGS / "slurm-merge.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "scontrol show hostnames" in text and "export MASTER_ADDR" in text and "export MASTER_PORT" in text
    assert any(line.strip().startswith("srun ") and "-m shardmerge" in line for line in text.splitlines())
    assert "#SBATCH --ntasks-per-node=1" in text

    expected = _reference(tmp_path, demo / "base", demo / "adapter", monkeypatch)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name, body in (("scontrol", _FAKE_SCONTROL), ("srun", _FAKE_SRUN)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    plan = _plan(tmp_path / "plan.yaml", demo / "base", demo / "adapter", tmp_path / "slurm")
    # What the batch step's environment looks like: SLURM_NTASKS/SLURM_PROCID=0 are there, but it is one process.
    env = _env(
        PATH=os.pathsep.join([str(fake), str(BIN), os.environ.get("PATH", "")]),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="127.0.0.1,node-2",
        SLURM_NNODES="2",
        SLURM_NTASKS="2",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_CPUS_PER_TASK="1",
        SRUN_LOG=str(tmp_path / "srun.log"),
        PYTHON=sys.executable,
        MASTER_PORT=str(_free_port()),
    )
    result = _timed(
        "configs/slurm-merge.sbatch 2 ranks (fake srun)",
        lambda: subprocess.run(
            ["bash", str(script), str(plan), "-q"], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
        ),
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert_same_tree(tmp_path / "slurm", expected, "slurm batch script, 2 ranks")
    assert f"rank 0 on 127.0.0.1:{env['MASTER_PORT']}" in result.stderr  # MASTER_ADDR from scontrol's first host
    assert "--kill-on-bad-exit=1" in (tmp_path / "srun.log").read_text()


def test_recipes_readme_covers_each_launcher():
    readme = (CONFIGS / "README.md").read_text()
    for needle in (
        "slurm-merge.sbatch",
        "torchrun.sh",
        "accelerate-config.yaml",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SHARDMERGE_DIST_TIMEOUT",
        "resume",
    ):
        assert needle in readme, needle


def teardown_module(module):
    if TIMINGS:
        print("\n" + "\n".join(f"[timing] {k}: {v:.1f}s" for k, v in TIMINGS.items()), file=sys.stderr)
