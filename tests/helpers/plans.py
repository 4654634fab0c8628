"""Plan files and the command line: as a user meets them, and in a forked child stopped at an exact call."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
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


def at_call(real, n: int, action, after: bool = False):
    """`real`, except that its n-th call (counted across threads as calls start) runs `action()` before the
    call, or with `after` just after that call returns."""
    lock, count = threading.Lock(), [0]

    def hooked(*args, **kwargs):
        with lock:
            count[0] += 1
            hit = count[0] == n
        if hit and not after:
            action()
        result = real(*args, **kwargs)
        if hit and after:
            action()
        return result

    return hooked


def fork_cli(*args, patch=None) -> int:
    """Fork; the child runs the CLI on ARGS (in this process's state: no interpreter start-up, test patches
    kept) with `patch` = (obj, attr, wrap) applied as obj.attr = wrap(obj.attr), its output discarded, and
    exits with the CLI's code without returning into pytest. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if patch is not None:
                obj, attr, wrap = patch
                setattr(obj, attr, wrap(getattr(obj, attr)))
            from shardmerge.cli import main

            code = main([str(a) for a in args])
        finally:
            os._exit(code)
    return pid


def killed_run(plan: Path, obj, attr: str, n: int, after: bool = False) -> int:
    """`PLAN -q` in a forked child that SIGKILLs itself at the n-th call of obj.attr (before it, or just after
    it returns); returns the child's wait status. Counting calls makes every kill point exact and reproducible."""

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    pid = fork_cli(plan, "-q", patch=(obj, attr, lambda real: at_call(real, n, kill, after)))
    return os.waitpid(pid, 0)[1]
