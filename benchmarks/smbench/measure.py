"""Measuring one command from outside, and rounds of jobs.

Every run is started by a tiny wrapper process (`bench.py _measure`) that spawns the command, waits for it
with wait4() and takes ru_maxrss from that child's own rusage, so the number is the peak RSS of the measured
process (the largest one in its tree), not of this script. After the command exits the wrapper fsyncs every
file it wrote (the "sync") inside the timed region. With --poll it also polls the process tree with psutil
and reports the summed RSS. The wrapper imports the standard library only, to stay small.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import (
    BENCH,
    PROJECT,
    dir_bytes,
    fmt_mb,
    global_sync,
    log,
    median,
    rmtree,
    tool_env,
)


@dataclass
class Measurement:
    """One measured run, as the wrapper wrote it (plus its log, error line and shardmerge's report)."""

    rc: int
    cmd: list[str]
    wall_s: float = 0.0  # spawn to the end of the sync
    cmd_s: float = 0.0
    sync_s: float = 0.0
    maxrss_bytes: int = 0
    tree_peak_rss_bytes: int | None = None
    wrapper_maxrss_bytes: int = 0
    utime_s: float = 0.0
    stime_s: float = 0.0
    files_synced: int = 0
    out_bytes: int = 0
    timed_out: bool = False
    log: str = ""
    error: str | None = None
    report: dict | None = None  # shardmerge's --report-json

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def cpu_s(self) -> float:
        return self.utime_s + self.stime_s


@dataclass
class Verification:
    """What tools._verify found in an output (see tools.cmd_verify)."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    n_problems: int = 0
    checked_merged: int = 0
    checked_copied: int = 0
    max_err_ulp: float | None = None
    min_exact_fraction: float | None = None


def _fsync(path: str) -> bool:
    """fsync one file or directory; False where it cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> int:
    """fsync every regular file and directory under `path`; returns how many files were synced."""
    n = 0
    if not path.exists():
        return 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p) and _fsync(p):
                n += 1
        _fsync(root)
    return n


def cmd_measure(a) -> int:
    import resource
    import signal

    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    wrapper_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logf = open(a.log, "ab", buffering=0)
    logf.write(("$ " + shlex.join(cmd) + "\n").encode())
    peak_tree = [0]
    stop = threading.Event()
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ),
                          file_actions=[(os.POSIX_SPAWN_DUP2, logf.fileno(), 1), (os.POSIX_SPAWN_DUP2, logf.fileno(), 2)],
                          setpgroup=0)  # fmt: skip

    def poll():
        import psutil

        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            total = 0
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak_tree[0] = max(peak_tree[0], total)
            stop.wait(a.poll_interval)

    poller = threading.Thread(target=poll, daemon=True) if a.poll else None
    if poller:
        poller.start()
    timed_out = [False]

    def kill():
        timed_out[0] = True
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(a.timeout, kill) if a.timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    _, status, ru = os.wait4(pid, 0)
    t1 = time.perf_counter()
    if timer:
        timer.cancel()
    stop.set()
    if poller:
        poller.join()
    rc = os.waitstatus_to_exitcode(status)
    synced = 0
    if rc == 0:
        if a.global_sync:
            global_sync()
        for d in a.sync:
            synced += fsync_tree(Path(d))
    t2 = time.perf_counter()
    out_bytes = sum(dir_bytes(Path(d)) for d in a.count) if rc == 0 else 0
    res = Measurement(rc=rc, timed_out=timed_out[0], wall_s=t2 - t0, cmd_s=t1 - t0, sync_s=t2 - t1,
                      maxrss_bytes=ru.ru_maxrss * 1024, tree_peak_rss_bytes=peak_tree[0] or None,
                      wrapper_maxrss_bytes=wrapper_rss, utime_s=ru.ru_utime, stime_s=ru.ru_stime,
                      files_synced=synced, out_bytes=out_bytes, cmd=cmd)  # fmt: skip
    Path(a.json).write_text(json.dumps(dataclasses.asdict(res), indent=2) + "\n")
    return 0


def measure(cmd: list[str], run_dir: Path, tag: str, log_dir: Path, *, sync_dirs=(), count_dirs=(), poll=False,
            timeout: float = 3600, cwd: Path = PROJECT, env=None) -> Measurement:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{tag}.log"
    json_path = log_dir / f"{tag}.json"
    wrapper = [sys.executable, str(BENCH), "_measure", "--json", str(json_path), "--log", str(log_path),
               "--timeout", str(timeout)]  # fmt: skip
    for d in sync_dirs:
        wrapper += ["--sync", str(d)]
    for d in count_dirs:
        wrapper += ["--count", str(d)]
    if poll:
        wrapper += ["--poll"]
    wrapper += ["--", *cmd]
    subprocess.run(wrapper, cwd=str(cwd), env=env or tool_env(), check=False)
    try:
        res = Measurement(**json.loads(json_path.read_text()))
    except (OSError, ValueError, TypeError):
        res = Measurement(rc=-999, cmd=cmd)
    res.log = str(log_path)
    if not res.ok:
        res.error = last_error_line(log_path, res)
    return res


def last_error_line(log_path: Path, res: Measurement) -> str:
    if res.timed_out:
        return "timed out"
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = [ln for ln in lines if not ln.startswith("$ ") and "Warning" not in ln[:40]]
    msg = lines[-1] if lines else f"exit {res.rc}"
    return (msg[:160] + "…") if len(msg) > 160 else msg


class Job:
    """One tool configuration measured once per round. `build(run_dir)` returns (cmd, out_dir)."""

    def __init__(self, name: str, kind: str, build, budget: int | None = None, display: str | None = None,
                 poll: bool = False, verify: bool = False, group: str = ""):  # fmt: skip
        self.name, self.kind, self.build, self.budget = name, kind, build, budget
        self.display = display
        self.poll, self.verify, self.group = poll, verify, group
        self.results: list[Measurement] = []
        self.failed: str | None = None
        self.verified: Verification | None = None
        self.retried: list[str] = []

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-").lower()


def verify_output(py: str, model: Path, out: Path, same_layout: bool, full: bool = False) -> Verification:
    cmd = [py, str(BENCH), "_verify", "--model", str(model), "--out", str(out)]
    if same_layout:
        cmd.append("--same-layout")
    if full:
        cmd.append("--full")
    r = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), cwd=str(PROJECT))
    try:
        return Verification(**json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        return Verification(ok=False, problems=[f"verifier crashed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"])


def run_rounds(jobs: list[Job], runs: int, work: Path, log_dir: Path, py: str, models: dict[str, Path],
               timeout: float, verify: bool, verify_full: bool = False, retries: int = 1, before_each=None) -> None:  # fmt: skip
    """Each round runs every job once, in an order rotated by the round number.

    A failed run is retried `retries` times (fresh output dir) before the tool is marked failed and
    skipped in later rounds; the retry is noted in the table. `before_each()` runs untimed before every
    measurement (the large mode drops the page cache there)."""
    for r in range(runs):
        order = jobs[r % len(jobs) :] + jobs[: r % len(jobs)]
        for job in order:
            if job.failed:
                continue
            res, run, out = _run_with_retries(job, r, runs, work, log_dir, timeout, retries, before_each)
            if res.ok:
                rep = run / "report.json"
                if rep.exists():
                    try:
                        res.report = json.loads(rep.read_text())
                    except ValueError:
                        res.report = None
                log(
                    f"  {res.wall_s:.2f} s (cmd {res.cmd_s:.2f} + sync {res.sync_s:.2f}), peak RSS "
                    f"{fmt_mb(res.maxrss_bytes)} MiB"
                )
                if verify and job.verify and out and job.verified is None:
                    model = models.get(job.group) or models[""]
                    job.verified = verify_output(py, model, out, same_layout=job.kind in ("shardmerge", "ranks"),
                                                 full=verify_full)  # fmt: skip
                    log(f"  verify: {'ok' if job.verified.ok else 'FAILED'} {job.verified}"[:300])
                job.results.append(res)
            else:
                job.failed = res.error or f"exit {res.rc}"
                log(f"  FAILED ({job.failed}); log: {res.log}")
            rmtree(run)


def _run_with_retries(
    job: Job, r: int, runs: int, work: Path, log_dir: Path, timeout: float, retries: int, before_each
) -> tuple[Measurement, Path, Path | None]:
    for attempt in range(retries + 1):
        run = work / job.slug
        rmtree(run)
        run.mkdir(parents=True)
        global_sync()  # untimed: flush earlier runs' dirty pages so they do not land in this one
        if before_each is not None:
            before_each()
        time.sleep(0.3)
        cmd, out = job.build(run)
        log(f"round {r + 1}/{runs}: {job.name}" + (f" (retry {attempt})" if attempt else ""))
        tag = f"{job.slug}-r{r + 1}" + (f"-retry{attempt}" if attempt else "")
        res = measure(cmd, run, tag, log_dir, sync_dirs=[run] if out else [],
                      count_dirs=[out] if out else [], poll=job.poll, timeout=timeout)  # fmt: skip
        if res.ok or attempt == retries:
            return res, run, out
        job.retried.append(f"round {r + 1}: {res.error}")
        log(f"  failed ({res.error}); retrying")
        rmtree(run)
        time.sleep(2)
    raise AssertionError("unreachable")


STAGES = ("read", "merge", "write", "copy", "hash")


def report_stages(report: dict | None) -> dict[str, float]:
    if not isinstance(report, dict):
        return {}
    for key in ("stage_seconds", "stages", "stage_busy_seconds", "busy_seconds"):
        v = report.get(key)
        if isinstance(v, dict):
            return {k: float(x) for k, x in v.items() if isinstance(x, (int, float))}
    return {
        k[: -len("_seconds")]: float(v)
        for k, v in report.items()
        if k.endswith("_seconds") and isinstance(v, (int, float)) and k[: -len("_seconds")] in STAGES
    }


def report_peaks(report: dict | None) -> dict[str, float]:
    if not isinstance(report, dict):
        return {}
    out = {}
    for k, v in report.items():
        if "peak" in k and isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict) and "peak" in k:
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
    return out


@dataclass
class Summary:
    """A job's runs reduced to medians (and ranges); the tables are made from these."""

    name: str
    kind: str
    budget: int | None
    n: int
    failed: str | None
    verified: Verification | None
    display: str | None
    group: str
    retried: list[str]
    wall: float | None = None
    wall_min: float | None = None
    wall_max: float | None = None
    cmd: float | None = None
    sync: float | None = None
    rss: float | None = None
    rss_max: float | None = None
    tree_rss: float | None = None
    out_bytes: float | None = None
    cpu: float | None = None
    stime: float | None = None
    wrapper_rss: float | None = None
    stages: dict[str, float] = field(default_factory=dict)
    report_seconds: float | None = None
    peaks: dict[str, float] = field(default_factory=dict)
    has_report: bool = False
    reports: list[dict] = field(default_factory=list)


def summarize(job: Job) -> Summary:
    rs = job.results
    s = Summary(job.name, job.kind, job.budget, len(rs), job.failed, job.verified, job.display, job.group, job.retried)
    if not rs:
        return s
    walls = [r.wall_s for r in rs]
    s = dataclasses.replace(
        s,
        wall=median(walls),
        wall_min=min(walls),
        wall_max=max(walls),
        cmd=median([r.cmd_s for r in rs]),
        sync=median([r.sync_s for r in rs]),
        rss=median([r.maxrss_bytes for r in rs]),
        rss_max=max(r.maxrss_bytes for r in rs),
        tree_rss=median([r.tree_peak_rss_bytes for r in rs]),
        out_bytes=median([r.out_bytes for r in rs]),
        cpu=median([r.cpu_s for r in rs]),
        stime=median([r.stime_s for r in rs]),
        wrapper_rss=median([r.wrapper_maxrss_bytes for r in rs]),
    )
    stages: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    for r in rs:
        for k, v in report_stages(r.report).items():
            stages.setdefault(k, []).append(v)
        for k, v in report_peaks(r.report).items():
            peaks.setdefault(k, []).append(v)
    s.stages = {k: median(v) for k, v in stages.items()}
    s.reports = [r.report for r in rs if isinstance(r.report, dict)]
    s.report_seconds = median([rep.get("seconds") for rep in s.reports])
    s.peaks = {k: median(v) for k, v in peaks.items()}
    s.has_report = bool(s.reports)
    return s
