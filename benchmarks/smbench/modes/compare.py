"""`compare`: copy floor, idle start-up, shardmerge at several budgets, PEFT and mergekit, interleaved per round."""

from __future__ import annotations

import time
from pathlib import Path

from ..common import csv_list, human, log, rmtree, size_arg
from ..measure import Job, Summary, run_rounds, summarize
from ..report import (
    code_fingerprint,
    code_note,
    compare_tables,
    env_block,
    write_results,
)
from ..synthetic import ensure_model
from ..tools import (
    check_shardmerge_ready,
    find_mergekit,
    job_copy,
    job_idle,
    job_kernel_copy,
    job_mergekit,
    job_peft,
    job_shardmerge,
)
from ._options import common

NAME = "compare"
HELP = "copy floor vs idle start-up vs shardmerge budgets vs PEFT vs mergekit"
ORDER = 10


def add_arguments(c) -> None:
    c.add_argument("--model", help="generated model dir")
    c.add_argument("--size-gb", type=float, help="generate (or reuse) a model of this size when --model has none")
    c.add_argument("--tools", default="copy,idle,shardmerge,peft,mergekit")
    c.add_argument(
        "--mergekit-python", help="python of a venv with mergekit (default: $MERGEKIT_PYTHON or /tmp/mkvenv)"
    )
    common(c, budgets="128MiB,256MiB,2GiB")


def run(a) -> int:
    return do_compare(a)


def build_compare_jobs(a, model: Path, py: str, device: str) -> tuple[list[Job], str | None, str | None]:
    tools = set(csv_list(a.tools))
    jobs = []
    if "copy" in tools:
        jobs.append(job_copy(model))
        jobs.append(job_kernel_copy(model))
    if "idle" in tools or "shardmerge" in tools:
        jobs.append(job_idle(py))
    if "shardmerge" in tools:
        for b in csv_list(a.budgets):
            jobs.append(job_shardmerge(py, model, size_arg(b), b, device=device))
    if "peft" in tools:
        jobs.append(job_peft(py, model))
    mkpy, mkver = (None, None)
    if "mergekit" in tools:
        mkpy, mkver = find_mergekit(a.mergekit_python)
        if mkpy:
            jobs.append(job_mergekit(mkpy, model))
        else:
            j = Job("mergekit base+lora", "mergekit", None)
            j.failed = "not installed"
            jobs.append(j)
    return jobs, mkpy, mkver


def do_compare(a, device: str = "cpu", title: str = "compare", key_prefix: str = "compare", extra: str = "") -> int:
    py = a.python
    model, meta = ensure_model(Path(a.model) if a.model else None, a.size_gb, a.seed)
    not_ready = check_shardmerge_ready(py)
    if not_ready:
        log(f"warning: shardmerge not importable yet ({not_ready}); its rows will show the failure")
    jobs, mkpy, mkver = build_compare_jobs(a, model, py, device)
    runnable = [j for j in jobs if not j.failed]
    work = Path(a.work) / key_prefix
    log_dir = Path(a.work) / "logs" / f"{key_prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"{title}: {len(runnable)} tools x {a.runs} runs on {model} ({human(meta['total_bytes'])}); logs in {log_dir}")
    head = env_block(f"{title}: {model.name}", meta, model, py, mkpy, mkver, extra)
    fp = code_fingerprint()
    run_rounds(
        runnable,
        a.runs,
        work,
        log_dir,
        py,
        {"": model},
        a.timeout,
        verify=not a.no_verify,
        verify_full=a.verify_full,
        retries=a.retries,
    )
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = [summarize(j) for j in jobs]
    idle = next((s for s in sums if s.kind == "idle"), None)
    copy = best_copy(sums)
    table = compare_tables(sums, idle, copy)
    cmds = "\n".join(f"- {s.name}: `{s.display}`" for s in sums if s.display)
    body = (
        head
        + f"\nruns per tool: {a.runs} (interleaved, order rotated each round)\n\n"
        + table
        + "\n\nCommands measured:\n\n"
        + cmds
        + "\n"
    )
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"{key_prefix}:{model.name}", body)
    bad = [s for s in sums if (s.failed and s.failed != "not installed") or (s.verified and not s.verified.ok)]
    return 1 if (bad and a.strict) else 0


def best_copy(sums: list[Summary]) -> Summary | None:
    """The copy floor: the fastest plain copier measured (each row names its copier)."""
    copies = [s for s in sums if s.kind == "copy" and s.wall is not None]
    return min(copies, key=lambda s: s.wall) if copies else None
