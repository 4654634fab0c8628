"""`install-mergekit`: a separate venv with mergekit, pinned to the project's torch (never the project venv)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..common import DEFAULT_MK_VENV, default_python, log
from ..tools import find_mergekit

NAME = "install-mergekit"
HELP = "create a separate venv with mergekit and the project's torch version"
ORDER = 80


def add_arguments(im) -> None:
    im.add_argument("--venv", default=str(DEFAULT_MK_VENV))
    im.add_argument("--torch", help="torch version to pin (default: the project venv's)")
    im.add_argument("--python", default=default_python())


def run(a) -> int:
    venv = Path(a.venv)
    torch_ver = a.torch
    if not torch_ver:
        r = subprocess.run(
            [a.python, "-c", "import torch; print(torch.__version__.split('+')[0])"], capture_output=True, text=True
        )
        torch_ver = r.stdout.strip() or "2.13.0"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    if subprocess.run([*pip, f"torch=={torch_ver}"]).returncode != 0:
        print(f"bench: could not install torch=={torch_ver} into {venv}", file=sys.stderr)
        return 1
    for spec in [
        "mergekit",
        "mergekit==0.1.4",
        "mergekit==0.1.3",
        "mergekit==0.1.2",
        "mergekit==0.1.0",
        "mergekit==0.0.6",
    ]:
        log(f"trying {spec} (torch pinned to {torch_ver})")
        if subprocess.run([*pip, spec, f"torch=={torch_ver}"]).returncode == 0:
            mkpy, ver = find_mergekit(str(py))
            if mkpy:
                log(f"mergekit {ver} installed in {venv}")
                return 0
    print(
        "bench: mergekit could not be installed with this torch; compare will report 'mergekit: not installed'",
        file=sys.stderr,
    )
    return 1
