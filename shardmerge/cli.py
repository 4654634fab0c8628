"""`python -m shardmerge PLAN.yaml` (merge), `python -m shardmerge verify OUTPUT` (check an output).

Errors the user can fix print one line on stderr and exit non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .config import OPTIONS
from .errors import InterruptedMerge, ShardmergeError, os_reason


def _merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmerge",
        description="Merge PEFT LoRA adapters into a sharded safetensors model, streaming, in a memory budget. "
        "Also: `shardmerge verify OUTPUT [--plan PLAN]`.",
    )
    parser.add_argument("plan", help="plan file (YAML): base, adapters, output and options")
    parser.add_argument("--dry-run", action="store_true", help="print what would be merged; write nothing")
    parser.add_argument("--report-json", metavar="FILE", help="write the run report (JSON) to FILE")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    for option in OPTIONS:
        flag = "--" + option.key.replace("_", "-")
        if option.switch:
            parser.add_argument(flag, dest=option.key, action="store_const", const=True, help=option.help)
        else:
            parser.add_argument(flag, dest=option.key, metavar=option.key.upper(), help=option.help)
    return parser


def _verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmerge verify", description="Check a merged output against its manifest and index."
    )
    parser.add_argument("output", help="a directory shardmerge wrote")
    parser.add_argument("--plan", help="also recompute a sample of merged tensors from this plan's inputs")
    parser.add_argument("--samples", type=_count, default=8, help="merged tensors to recompute with --plan")
    parser.add_argument(
        "--max-memory",
        help="host-RAM budget for the recomputation, e.g. 2GiB (default: the plan's max_memory, as a merge)",
    )
    return parser


def _count(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of tensors (0 or more), got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def terminated(signum, _frame):
        raise InterruptedMerge(signum)

    # Outside the executor (planning, finalizing) SIGTERM still ends with one line and exit 143.
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if on_main else None
    try:
        if argv and argv[0] == "verify":
            return _verify(_verify_parser().parse_args(argv[1:]))
        return _merge(_merge_parser().parse_args(argv))
    except ShardmergeError as e:
        print(f"shardmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("shardmerge: error: interrupted by SIGINT; re-run the same plan to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print("shardmerge: error: out of memory; lower max_memory or free memory on this node", file=sys.stderr)
        return 1
    except OSError as e:  # an output path that is a file, a read-only or full filesystem, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"shardmerge: error: {where}{os_reason(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: still one line, with the way to get the details
        if os.environ.get("SHARDMERGE_TRACEBACK"):
            raise
        print(
            f"shardmerge: error: internal error {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
            "(please report it; set SHARDMERGE_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 70
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _merge(args: argparse.Namespace) -> int:
    from .config import load_plan
    from .distributed import topology
    from .runner import report_json, run

    overrides = {o.key: getattr(args, o.key) for o in OPTIONS}
    plan = load_plan(args.plan, **overrides)
    topo = topology()  # the launcher's ranks (torchrun, accelerate, srun), or a single process
    report = run(plan, dry_run=args.dry_run, progress=not args.quiet, topology=topo)
    if topo.rank != 0:  # one report for the job (it is gathered from every rank)
        return 0
    if args.dry_run:
        print(report.description)
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            f.write(report_json(report))
    for line in report.warnings:
        print(f"shardmerge: warning: {line}", file=sys.stderr)
    if not args.quiet and not args.dry_run:
        print(report.summary(), file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .units import parse_size
    from .verify import verify

    budget = None if args.max_memory is None else parse_size(args.max_memory, "--max-memory")
    problems = verify(args.output, plan=args.plan, samples=args.samples, max_memory=budget)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"shardmerge: verify: {len(problems)} problem(s) in {args.output}", file=sys.stderr)
        return 1
    print(f"{args.output}: OK", file=sys.stderr)
    return 0
