"""Paths, units, formatting and the environment every measured tool runs in."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
PROJECT = HERE.parent
BENCH = HERE / "bench.py"  # re-run as `bench.py _measure ...` etc. by the measuring wrapper
DEFAULT_ROOT = Path(os.environ.get("SM_BENCH_ROOT", "/tmp/sm-bench"))
DEFAULT_RESULTS = HERE / "RESULTS.md"
DEFAULT_MK_VENV = Path("/tmp/mkvenv")
GB = 10**9
MB = 10**6
MiB = 2**20


def size_arg(text: str) -> int:
    """An argparse type for sizes, parsed exactly as shardmerge parses max_memory ('256MiB', '2GB', bytes)."""
    sys.path.insert(0, str(PROJECT))
    from shardmerge.errors import ShardmergeError
    from shardmerge.units import parse_size

    try:
        return parse_size(text, "size")
    except ShardmergeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def fmt_mb(nbytes: float | None) -> str:
    """Memory is reported in MiB throughout (budgets are given in MiB/GiB)."""
    return "–" if nbytes is None else f"{nbytes / MiB:.0f}"


def human(nbytes: float) -> str:
    for unit, div in (("GB", GB), ("MB", MB), ("KB", 10**3)):
        if abs(nbytes) >= div:
            return f"{nbytes / div:.2f} {unit}"
    return f"{nbytes:.0f} B"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def default_python() -> str:
    venv = PROJECT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def tool_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("HF_HOME", str(DEFAULT_ROOT / "hf-home"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


def global_sync() -> None:
    try:
        os.sync()
    except (AttributeError, OSError):
        subprocess.run(["sync"], check=False)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
