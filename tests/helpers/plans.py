"""Plan files and the command line, as a user meets them."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import yaml


def _plain(value):
    """Paths as strings, at any depth (an adapter entry's path too): YAML has no Path."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_plan(path: Path, **plan) -> Path:
    """A plan file holding exactly the keys given (base, adapters, output, options; a test of a bad plan
    leaves one out or gives a bad value). Relative paths resolve against the plan file's folder."""
    Path(path).write_text(yaml.safe_dump(_plain(plan), sort_keys=False))
    return Path(path)


def run_cli(*args, cwd=None, process: bool = False, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m shardmerge ARGS` in `cwd`: its exit code, stdout and stderr.

    In this process by default (no interpreter start-up; `shardmerge.cli.main` is what `python -m shardmerge`
    calls); in a real interpreter with `process`, as a user's shell runs it: with `env` as its environment,
    killed after `timeout` seconds.
    """
    argv = [str(a) for a in args]
    if process:
        command = [sys.executable, "-m", "shardmerge", *argv]
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    from shardmerge.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["shardmerge", *argv], rc, out.getvalue(), err.getvalue())
