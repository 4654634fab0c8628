"""`smoke`: a tiny end-to-end run of the machinery, for CI."""

from __future__ import annotations

from pathlib import Path

from ..common import DEFAULT_RESULTS, rmtree
from ._options import common
from .compare import do_compare

NAME = "smoke"
HELP = "tiny end-to-end run for CI (generate + compare, runs=1)"
ORDER = 70


def add_arguments(sm) -> None:
    sm.add_argument("--size-gb", type=float, default=0.05)
    sm.add_argument("--tools", default="copy,idle,shardmerge,peft,mergekit")
    sm.add_argument("--mergekit-python")
    sm.add_argument("--keep-model", action="store_true")
    sm.add_argument(
        "--keep-going", action="store_true", help="exit 0 even when a tool fails (default: fail like --strict)"
    )
    common(sm, budgets="64MiB,256MiB", runs=1)


def run(a) -> int:
    a.strict = not a.keep_going
    root = Path(a.root)
    a.model = str(root / f"smoke-{a.size_gb:g}g")
    if a.results == str(DEFAULT_RESULTS):
        a.results = str(root / "SMOKE-RESULTS.md")
    rc = do_compare(a, title="smoke", key_prefix="smoke")
    if not a.keep_model:
        rmtree(Path(a.model))
    return rc
