"""Flags shared by the measuring modes."""

from __future__ import annotations

from ..common import DEFAULT_RESULTS, DEFAULT_ROOT, default_python


def common(sp, budgets=None, runs=3):
    sp.add_argument(
        "--python", default=default_python(), help="python that runs shardmerge/PEFT (default: the project .venv)"
    )
    sp.add_argument("--root", default=str(DEFAULT_ROOT), help="where generated models go (default %(default)s)")
    sp.add_argument(
        "--work", default=str(DEFAULT_ROOT / "work"), help="scratch for outputs and logs (default %(default)s)"
    )
    sp.add_argument("--results", default=str(DEFAULT_RESULTS), help="results markdown file (default %(default)s)")
    sp.add_argument("--no-results", action="store_true", help="print the table only")
    sp.add_argument("--runs", type=int, default=runs, help="measurements per tool; the median is reported")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--timeout", type=float, default=3600, help="seconds per measured run")
    sp.add_argument(
        "--no-verify", action="store_true", help="skip the correctness check of the first output of each tool"
    )
    sp.add_argument(
        "--verify-full",
        action="store_true",
        help="verify every tensor (default: embeddings, head, first and last layer)",
    )
    sp.add_argument("--strict", action="store_true", help="exit 1 when a tool fails or an output does not verify")
    sp.add_argument(
        "--retries",
        type=int,
        default=1,
        help="re-run a failed measurement this many times before giving up on the tool",
    )
    if budgets is not None:
        sp.add_argument("--budgets", default=budgets, help="comma-separated --max-memory values (default %(default)s)")
