"""`sweep`: model size against wall time and peak RSS at one fixed budget."""

from __future__ import annotations

import time
from pathlib import Path

from ..common import GB, MiB, csv_list, fmt_mb, fmt_s, rmtree, size_arg
from ..measure import run_rounds, summarize
from ..report import (
    code_fingerprint,
    code_note,
    env_block,
    md_table,
    verify_note,
    write_results,
)
from ..synthetic import SHAPES, generate_model, model_dir_for
from ..tools import job_copy, job_idle, job_shardmerge
from ._options import common

NAME = "sweep"
HELP = "model size vs wall time vs peak RSS at one budget"
ORDER = 20


def add_arguments(s) -> None:
    s.add_argument("--sizes", default="0.5,1,2,4")
    s.add_argument("--budget", default="256MiB")
    s.add_argument(
        "--shape", default="h2048", choices=list(SHAPES), help="one shape for every size (default %(default)s)"
    )
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-copy", action="store_true", help="skip the per-size copy floor")
    common(s, runs=1)


def run(a) -> int:
    py = a.python
    sizes = [float(x) for x in csv_list(a.sizes)]
    models = {}
    metas = {}
    for sz in sizes:
        g = f"{sz:g}GB"
        m = model_dir_for(sz, Path(a.root), prefix=f"sweep-{a.shape}")
        metas[g] = generate_model(m, sz, seed=a.seed, shape_name=a.shape)
        models[g] = m
    jobs = [job_idle(py)]
    for g, m in models.items():
        if not a.no_copy:
            jobs.append(job_copy(m, group=g))
        jobs.append(job_shardmerge(py, m, size_arg(a.budget), a.budget, device=a.device, group=g))
    work = Path(a.work) / "sweep"
    log_dir = Path(a.work) / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    mkpy, mkver = None, None
    head = env_block(
        f"sweep: model size vs time and memory at max_memory {a.budget}",
        None,
        models[next(iter(models))],
        py,
        mkpy,
        mkver,
    )
    fp = code_fingerprint()
    run_rounds(jobs, a.runs, work, log_dir, py, {"": next(iter(models.values())), **models}, a.timeout,
               verify=not a.no_verify, retries=a.retries)  # fmt: skip
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = {j.name: summarize(j) for j in jobs}
    idle = sums[jobs[0].name]
    rows = []
    budget = size_arg(a.budget)
    for g in models:
        mm = metas[g]
        c = next((summarize(j) for j in jobs if j.kind == "copy" and j.group == g), None)
        s = next(summarize(j) for j in jobs if j.kind == "shardmerge" and j.group == g)
        if not s.n:
            rows.append([f"{mm['total_bytes'] / GB:.2f}", mm["layers"], fmt_s(c.wall if c else None), "–", "–", "–", "–", "–",
                         f"FAILED: {s.failed}"])  # fmt: skip
            continue
        minus = s.wall - idle.wall if idle.wall is not None else None
        above = s.rss - idle.rss if idle.rss is not None else None
        notes = [verify_note(s)] if s.verified else []
        if s.stages:
            notes.append("stages " + ", ".join(f"{k} {fmt_s(v)}" for k, v in s.stages.items()))
        if above is not None and above > budget:
            notes.append("**OVER BUDGET**")
        rows.append([f"{mm['total_bytes'] / GB:.2f}", mm["layers"], fmt_s(c.wall if c else None), fmt_s(s.wall),
                     fmt_s(minus), (f"{minus / (mm['total_bytes'] / GB):.2f}" if minus is not None else "–"),
                     (f"{minus / c.wall:.2f}" if (c and c.wall and minus is not None) else "–"),
                     fmt_mb(above), "; ".join(n for n in notes if n)])  # fmt: skip
    table = md_table(["model GB", "layers", "copy floor s", "shardmerge wall s", "wall − start-up s", "s per GB",
                      "× copy floor", "RSS above idle MiB", "notes"], rows)  # fmt: skip
    body = (head + f"\nshape {a.shape} for every size (only the layer count changes); budget {a.budget} "
            f"({budget / MiB:.0f} MiB); idle start-up {fmt_s(idle.wall)} s, {fmt_mb(idle.rss)} MiB; runs {a.runs}\n\n" + table + "\n")  # fmt: skip
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"sweep:{a.shape}:{a.budget}", body)
    return 0
