"""Tables, machine and version facts, and RESULTS.md sections."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .common import (
    BENCH,
    DEFAULT_ROOT,
    PROJECT,
    MiB,
    fmt_mb,
    fmt_s,
    human,
    log,
    tool_env,
)
from .measure import STAGES, Summary


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def verify_note(s: Summary) -> str:
    v = s.verified
    if not v:
        return ""
    if v.ok:
        return f"verified vs fp32 W+sBA (max {v.max_err_ulp} ulp, exact {v.min_exact_fraction})"
    return "VERIFY FAILED: " + "; ".join(v.problems[:3])


def compare_tables(sums: list[Summary], idle: Summary | None, copy: Summary | None) -> str:
    idle_wall = idle.wall if idle else None
    idle_rss = idle.rss if idle else None
    copy_wall = copy.wall if copy else None
    rows = []
    for s in sums:
        if s.failed and not s.n:
            note = "not installed" if s.failed == "not installed" else f"FAILED: {s.failed}"
            rows.append([s.name, "–", "–", "–", "–", "–", "–", note])
            continue
        wall = s.wall
        notes = []
        minus = ratio = above = None
        if s.kind == "copy":  # `copy` is the fastest copier: the floor every ratio is taken against
            ratio = wall / copy_wall if copy_wall else None
            notes.append(f"copy {fmt_s(s.cmd)} s + sync {fmt_s(s.sync)} s" + (" (the floor)" if s is copy else ""))
        elif s.kind == "idle":
            notes.append("reported separately; subtracted from shardmerge rows")
        else:
            if idle_wall is not None and s.kind in ("shardmerge", "ranks"):
                minus = wall - idle_wall
            base_for_ratio = minus if minus is not None else wall
            ratio = base_for_ratio / copy_wall if copy_wall else None
            if idle_rss is not None and s.rss is not None:
                above = s.rss - idle_rss
            if s.kind == "shardmerge" and s.budget:
                b = s.budget
                if above is not None:
                    worst = s.rss_max - idle_rss
                    notes.append(f"RSS above idle {above / MiB:.0f} MiB (worst run {worst / MiB:.0f}) = "
                                 f"{above / b:.2f}x budget {b / MiB:.0f} MiB"
                                 + (" **OVER BUDGET**" if worst > b else ""))  # fmt: skip
                if not s.has_report:
                    notes.append("no --report-json file")
            if s.sync and s.sync > 0.05:
                notes.append(f"sync {fmt_s(s.sync)} s")
        if s.n > 1:
            notes.insert(0, f"range {fmt_s(s.wall_min)}–{fmt_s(s.wall_max)} s")
        if s.failed:
            notes.append(f"later run FAILED: {s.failed}")
        if s.retried:
            notes.append(f"{len(s.retried)} run(s) retried after: {s.retried[0]}")
        vn = verify_note(s)
        if vn:
            notes.append(vn)
        rows.append([s.name, fmt_s(wall), fmt_s(minus), ("–" if ratio is None else f"{ratio:.2f}"),
                     fmt_mb(s.rss), fmt_mb(above), f"{s.n}", "; ".join(notes)])  # fmt: skip
    t = md_table(["tool", "median wall s", "wall − start-up s", "× copy floor", "peak RSS MiB", "RSS above idle MiB",
                  "runs", "notes"], rows)  # fmt: skip
    stage_rows = []
    keys: list[str] = []
    for s in sums:
        for k in s.stages:
            if k not in keys:
                keys.append(k)
    keys = [k for k in STAGES if k in keys] + [k for k in keys if k not in STAGES]
    for s in sums:
        if s.stages:
            peaks = ", ".join(f"{k}={human(v) if v > 10_000 else v}" for k, v in s.peaks.items())
            stage_rows.append([s.name, fmt_s(s.report_seconds), *[fmt_s(s.stages.get(k)) for k in keys],
                               peaks or "–"])  # fmt: skip
    if stage_rows:
        t += "\n\nshardmerge per-stage busy seconds (median, from --report-json; stages overlap, so they can add up to more than wall):\n\n"
        t += md_table(["run", "report seconds", *keys, "report peaks (median)"], stage_rows)
    return t


def machine_info(path: Path) -> dict:
    info = {"host": platform.node(), "kernel": platform.release()}
    cpu = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal"):
                info["ram"] = f"{int(ln.split()[1]) * 1024 / 2**30:.1f} GiB"
    except OSError:
        pass
    try:
        info["load_avg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    # disk holding `path`: mount, fs type, device, rotational flag, free space
    p = path
    while not p.exists():
        p = p.parent
    best = ("", "?", "?")
    try:
        for ln in open("/proc/mounts"):
            dev, mnt, fstype = ln.split()[:3]
            if str(p.resolve()).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    du = shutil.disk_usage(p)
    disk = f"{best[2]} ({best[1]}) mounted at {best[0]}, {du.total / 2**30:.0f} GiB, {du.free / 2**30:.0f} GiB free"
    devname = os.path.basename(best[2])
    base = re.sub(r"p?\d+$", "", devname) if not devname.startswith("nvme") else re.sub(r"p\d+$", "", devname)
    for cand in (devname, base):
        rot = Path(f"/sys/block/{cand}/queue/rotational")
        if rot.exists():
            disk += ", " + ("rotational" if rot.read_text().strip() == "1" else "non-rotational")
            break
    info["disk"] = disk
    return info


def versions(py: str, mkpy: str | None, mkver: str | None) -> dict:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "v = {'python': sys.version.split()[0]}\n"
        "for n in ('torch', 'peft', 'transformers', 'safetensors', 'shardmerge'):\n"
        "    try: v[n] = m.version(n)\n"
        "    except Exception: v[n] = 'not installed'\n"
        "try:\n    import shardmerge; v['shardmerge'] = shardmerge.__version__\n"
        "except Exception as e: v['shardmerge'] += f' (import failed: {e})'\n"
        "print(json.dumps(v))\n"
    )
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=tool_env(), cwd=str(PROJECT))
    try:
        v = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        v = {"python": "?"}
    try:
        rev = subprocess.run(
            ["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--", "shardmerge"],
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
            v["shardmerge"] += f" (git {rev.stdout.strip()}{', uncommitted changes' if dirty else ''})"
        else:
            v["shardmerge"] += " (no git commit yet)"
    except OSError:
        pass
    if mkpy or mkver:  # (None, None): mergekit is not part of this mode
        v["mergekit"] = mkver if mkpy else "not installed"
    if mkpy:
        r = subprocess.run([mkpy, "-c", "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"],
                           capture_output=True, text=True, env=tool_env())  # fmt: skip
        if r.returncode == 0:
            t, tr, pe = r.stdout.split()
            v["mergekit"] += f" (its venv: torch {t}, transformers {tr}, peft {pe})"
    return v


def code_fingerprint() -> str:
    """Hash of shardmerge/*.py as they are on disk now: to notice the code changing under a benchmark."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((PROJECT / "shardmerge").rglob("*.py")):
        try:
            h.update(f.relative_to(PROJECT).as_posix().encode() + b"\0" + f.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:12]


def code_note(start_fp: str) -> str:
    end_fp = code_fingerprint()
    if end_fp == start_fp:
        return f"shardmerge source fingerprint {start_fp} (unchanged during the benchmark)"
    log("WARNING: shardmerge's source changed while the benchmark ran; numbers mix versions")
    return (
        f"**WARNING: shardmerge's source changed during this benchmark** (fingerprint {start_fp} -> {end_fp}); "
        "runs mix code versions, re-run for clean numbers"
    )


def the_command() -> str:
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, Path.cwd()) if Path(exe).is_relative_to(Path.cwd()) else exe
    except (ValueError, AttributeError):
        pass
    bench = os.path.relpath(BENCH, Path.cwd()) if BENCH.is_relative_to(Path.cwd()) else str(BENCH)
    args = [exe, bench, *sys.argv[1:]]
    return shlex.join(args)


RESULTS_HEADER = """# shardmerge benchmark results

Written by `benchmarks/bench.py` (see `benchmarks/README.md` for the method). Each section is
replaced when the same mode is re-run on the same model; sections for other modes/models are kept.
Every number is the median over the runs; each run is its own process, measured from outside by a
small wrapper: wall time includes an fsync of every output file ("sync"), and peak RSS is the
measured process's own `ru_maxrss` (from `wait4`), never this script's. Files are read from a warm
page cache (the base model fits in RAM), so the copy floor is "write the model once and fsync it".
"""


def write_results(path: Path, key: str, body: str) -> None:
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        post = post.lstrip("\n")
        text = pre + section + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"results written to {path} (section {key})")


def env_block(title: str, model_meta: dict | None, model: Path | None, py: str, mkpy, mkver, extra: str = "") -> str:
    m = machine_info(model or DEFAULT_ROOT)
    v = versions(py, mkpy, mkver)
    lines = [f"## {title}", "", f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- machine: {m['cpu']}, {m['cores']} cores ({m.get('usable_cores', '?')} usable), {m.get('ram', '?')} RAM, "
             f"load avg at start {m.get('load_avg', '?')}; kernel {m['kernel']}",
             f"- disk: {m['disk']}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- command: `{the_command()}`"]  # fmt: skip
    if model_meta and model:
        mm = model_meta
        lines.append(f"- model: `{model}`: synthetic Llama shape hidden {mm['hidden']}, intermediate {mm['intermediate']}, "
                     f"vocab {mm['vocab']}, {mm['layers']} layers, {human(mm['total_bytes'])} bf16 "
                     f"({mm['total_bytes'] / 2**30:.2f} GiB) in {mm['shards']} shards; adapter r={mm['rank']}, "
                     f"alpha={mm['lora_alpha']} on {'/'.join(mm.get('projections') or ['all 7 projections'])} ({mm['adapter_dtype']}, {human(mm['adapter_bytes'])})")  # fmt: skip
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"
