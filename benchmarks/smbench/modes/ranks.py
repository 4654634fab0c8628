"""`ranks`: torchrun --nproc_per_node N -m shardmerge for several N."""

from __future__ import annotations

import time
from pathlib import Path

from ..common import GB, csv_list, fmt_mb, fmt_s, rmtree
from ..measure import run_rounds, summarize
from ..report import (
    code_fingerprint,
    code_note,
    env_block,
    md_table,
    verify_note,
    write_results,
)
from ..synthetic import ensure_model
from ..tools import job_copy, job_idle, job_ranks
from ._options import common

NAME = "ranks"
HELP = "torchrun --nproc_per_node N for several N"
ORDER = 30


def add_arguments(r) -> None:
    r.add_argument("--model")
    r.add_argument("--size-gb", type=float)
    r.add_argument("--ranks", default="1,2,4")
    r.add_argument("--budget", default="1GiB")
    common(r, runs=1)


def run(a) -> int:
    py = a.python
    model, meta = ensure_model(Path(a.model) if a.model else None, a.size_gb, a.seed)
    jobs = [job_copy(model), job_idle(py)] + [job_ranks(py, model, int(n), a.budget) for n in csv_list(a.ranks)]
    work = Path(a.work) / "ranks"
    log_dir = Path(a.work) / "logs" / f"ranks-{time.strftime('%Y%m%d-%H%M%S')}"
    head = env_block(f"ranks: torchrun scale-out on {model.name}", meta, model, py, None, None)
    fp = code_fingerprint()
    run_rounds(jobs, a.runs, work, log_dir, py, {"": model}, a.timeout, verify=not a.no_verify, retries=a.retries)
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = [summarize(j) for j in jobs]
    copy, idle = sums[0], sums[1]
    rows = []
    for s in sums:
        if not s.n:
            rows.append([s.name, "–", "–", "–", "–", "–", "–", f"FAILED: {s.failed}"])
            continue
        gbps = (s.out_bytes / GB / s.wall) if s.out_bytes else None
        minus = s.wall - idle.wall if (s.kind == "ranks" and idle.wall) else None
        gbps_minus = (s.out_bytes / GB / minus) if (s.out_bytes and minus and minus > 0) else None
        ratio = s.wall / copy.wall if (copy.wall and s.kind != "idle") else None
        notes = []
        if s.kind == "idle":
            notes.append("per process; torchrun starts N of these plus its launcher")
        if s.tree_rss:
            notes.append(f"summed RSS of the tree (launcher + ranks) {fmt_mb(s.tree_rss)} MiB (psutil, 20 ms)")
        reps = s.reports
        if reps and "ranks" in reps[0]:
            notes.append(f"report: ranks={reps[0]['ranks']}")
        if s.stages:
            notes.append("stages " + ", ".join(f"{k} {fmt_s(v)}" for k, v in s.stages.items()))
        vn = verify_note(s)
        if vn:
            notes.append(vn)
        if s.failed:
            notes.append(f"later run FAILED: {s.failed}")
        rows.append([s.name, fmt_s(s.wall), (f"{gbps:.2f}" if gbps else "–"),
                     (f"{gbps_minus:.2f}" if gbps_minus else "–"), (f"{ratio:.2f}" if ratio else "–"),
                     fmt_mb(s.rss), fmt_s(s.cpu), "; ".join(notes)])  # fmt: skip
    table = md_table(["run", "median wall s", "output GB/s", "GB/s excl. one start-up", "× copy floor",
                      "peak RSS MiB (largest process)", "CPU s", "notes"], rows)  # fmt: skip
    body = head + f"\nbudget {a.budget} (per rank, as passed with --max-memory); runs {a.runs}\n\n" + table + "\n"
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"ranks:{model.name}", body)
    return 0
