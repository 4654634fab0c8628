"""`large`: a model larger than RAM, cold cache, against the disk's limit.

The model is generated tensor by tensor (never held whole) with 5 GB shards. Each round measures, in a
rotated order and each after a page-cache drop (when root): the concurrent read+write limit (the base read
while O_DIRECT writes the same bytes), `cp -r`, a copy_file_range copier, idle start-up and shardmerge at the
budget. The table gives each tool's ratio to the limit, CPU seconds (user+system) and peak RSS above idle.
The model is deleted afterwards unless --keep-model.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ..common import GB, MiB, fmt_mb, fmt_s, log, rmtree, size_arg, tool_env
from ..measure import Summary, run_rounds, summarize
from ..report import (
    code_fingerprint,
    code_note,
    env_block,
    md_table,
    verify_note,
    write_results,
)
from ..synthetic import generate_model
from ..tools import job_copy, job_idle, job_kernel_copy, job_rw_limit, job_shardmerge
from ._options import common

NAME = "large"
HELP = "model larger than RAM (streamed), cold cache: read+write limit, cp, shardmerge; table to RESULTS.md"
ORDER = 40


def add_arguments(p) -> None:
    p.add_argument("--size-gb", type=float, help="model size (default: 1.15x this machine's RAM)")
    p.add_argument("--model", help="model dir (default ROOT/large-<size>g)")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--budget", default="256MiB")
    p.add_argument("--keep-model", action="store_true", help="keep the generated model (it is deleted by default)")
    common(p, runs=2)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cold_model(python: str):
    """Before each run: drop the page cache (root only), then warm the interpreter and torch again with one
    untimed import, so every tool reads the model cold while start-up stays what `idle start-up` measures."""

    def before() -> None:
        if os.geteuid() == 0:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        subprocess.run([python, "-c", "import torch, shardmerge"], env=tool_env(), check=False)

    return before


def run(a) -> int:
    size_gb = a.size_gb or round(1.15 * ram_bytes() / GB, 1)
    model = Path(a.model) if a.model else Path(a.root) / f"large-{size_gb:g}g"
    meta = generate_model(model, size_gb, seed=a.seed, shard_bytes=size_arg(a.shard_size))
    if meta["total_bytes"] <= ram_bytes():
        log(f"warning: the model ({meta['total_bytes'] / GB:.1f} GB) fits in RAM ({ram_bytes() / GB:.1f} GB)")
    limit, idle = job_rw_limit(model), job_idle(a.python)
    merge = job_shardmerge(a.python, model, size_arg(a.budget), a.budget)
    jobs = [limit, job_copy(model), job_kernel_copy(model), idle, merge]
    cold = os.geteuid() == 0
    head = env_block(
        f"large: {model.name}, larger than RAM, {'cold' if cold else 'warm (not root)'} cache",
        meta,
        model,
        a.python,
        None,
        None,
    )
    fp = code_fingerprint()
    work = Path(a.work) / "large"
    log_dir = Path(a.work) / "logs" / f"large-{time.strftime('%Y%m%d-%H%M%S')}"
    run_rounds(
        jobs,
        a.runs,
        work,
        log_dir,
        a.python,
        {"": model},
        a.timeout,
        verify=not a.no_verify,
        retries=a.retries,
        before_each=cold_model(a.python),
    )
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    if not a.keep_model:
        rmtree(model)
    sums = [summarize(j) for j in jobs]
    body = head + _body(a, sums, meta, cold)
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"large:{a.budget}", body)
    return 0


def _body(a, sums: list[Summary], meta: dict, cold: bool) -> str:
    limit = next(s for s in sums if s.kind == "limit")
    idle = next(s for s in sums if s.kind == "idle")
    rows = []
    for s in sums:
        if not s.n:
            rows.append([s.name, "–", "–", "–", "–", "–", "–", f"FAILED: {s.failed}"])
            continue
        net = s.wall - idle.wall if s.kind == "shardmerge" and idle.wall is not None else None
        ratio = (net if net is not None else s.wall) / limit.wall if limit.wall and s.kind != "idle" else None
        above = s.rss - idle.rss if s.kind == "shardmerge" and idle.rss is not None else None
        notes = [f"range {fmt_s(s.wall_min)}–{fmt_s(s.wall_max)} s"] if s.n > 1 else []
        if s.stages:
            notes.append("busy " + ", ".join(f"{k} {fmt_s(v)}" for k, v in s.stages.items()))
        if above is not None and s.budget:
            notes.append(
                f"RSS above idle {above / s.budget:.2f}x budget" + (" **OVER BUDGET**" if above > s.budget else "")
            )
        if s.verified:
            notes.append(verify_note(s))
        rows.append(
            [
                s.name,
                fmt_s(s.wall),
                fmt_s(net),
                "–" if ratio is None else f"{ratio:.2f}",
                fmt_s(s.cpu),
                fmt_s(s.stime),
                fmt_mb(above),
                "; ".join(notes),
            ]
        )
    table = md_table(
        [
            "tool",
            "median wall s",
            "wall − start-up s",
            "× read+write limit",
            "CPU s",
            "of which system s",
            "RSS above idle MiB",
            "notes",
        ],
        rows,
    )
    cmds = "\n".join(f"- {s.name}: `{s.display}`" for s in sums if s.display)
    return (
        f"\nmodel {meta['total_bytes'] / GB:.1f} GB in {meta['shards']} shards; budget {a.budget} "
        f"({size_arg(a.budget) / MiB:.0f} MiB); runs {a.runs}, order rotated each round; "
        f"{'page cache dropped before every run, then the interpreter re-warmed' if cold else 'page cache NOT dropped (not root)'}\n\n"
        + table
        + "\n\nCommands measured:\n\n"
        + cmds
        + "\n"
    )
