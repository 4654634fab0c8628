"""`bench.py MODE ...`: the modes found in smbench.modes, plus the internal helpers run in child processes."""

from __future__ import annotations

import argparse

from . import modes
from .measure import cmd_measure
from .tools import cmd_copy, cmd_peft, cmd_verify

DESCRIPTION = "shardmerge benchmark harness: synthetic models, side-by-side timings, peak memory, RESULTS.md."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.py", description=DESCRIPTION)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in modes.modes():
        mode.add_arguments(sub.add_parser(mode.NAME, help=mode.HELP))
        sub.choices[mode.NAME].set_defaults(func=mode.run)

    # internal modes
    me = sub.add_parser("_measure")
    me.add_argument("--json", required=True)
    me.add_argument("--log", required=True)
    me.add_argument("--sync", action="append", default=[])
    me.add_argument("--count", action="append", default=[])
    me.add_argument("--poll", action="store_true")
    me.add_argument("--poll-interval", type=float, default=0.02)
    me.add_argument("--global-sync", action="store_true")
    me.add_argument("--timeout", type=float, default=0)
    me.add_argument("cmd", nargs=argparse.REMAINDER)
    me.set_defaults(func=cmd_measure)
    pe = sub.add_parser("_peft")
    pe.add_argument("--base", required=True)
    pe.add_argument("--adapter", required=True)
    pe.add_argument("--out", required=True)
    pe.set_defaults(func=cmd_peft)
    ve = sub.add_parser("_verify")
    ve.add_argument("--model", required=True)
    ve.add_argument("--out", required=True)
    ve.add_argument("--same-layout", action="store_true")
    ve.add_argument("--full", action="store_true")
    ve.set_defaults(func=cmd_verify)

    co = sub.add_parser("_copy")
    co.add_argument("--src", required=True)
    co.add_argument("--out", required=True)
    co.set_defaults(func=cmd_copy)

    a = p.parse_args(argv)
    return a.func(a)
