"""`gpu`: the one command for a CUDA machine: a big model, copy floor vs shardmerge --device cuda."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..common import log, tool_env
from ..synthetic import model_dir_for
from ._options import common
from .compare import do_compare

NAME = "gpu"
HELP = "CUDA machine: generate a big model, copy floor vs shardmerge --device cuda"
ORDER = 60


def add_arguments(gp) -> None:
    gp.add_argument("--size-gb", type=float, default=16)
    gp.add_argument("--model")
    gp.add_argument("--tools", default="copy,idle,shardmerge")
    gp.add_argument("--mergekit-python")
    common(gp, budgets="512MiB,2GiB,8GiB", runs=3)


def run(a) -> int:
    py = a.python
    probe = subprocess.run([py, "-c", "import torch; assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'; "
                            "print(torch.cuda.get_device_name(0)); print(torch.version.cuda)"],
                           capture_output=True, text=True, env=tool_env())  # fmt: skip
    if probe.returncode != 0:
        print(f"bench gpu: no usable CUDA device: {(probe.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return 2
    name, cuda = probe.stdout.strip().splitlines()[:2]
    log(f"CUDA device: {name} (CUDA {cuda})")
    a.model = a.model or str(model_dir_for(a.size_gb, Path(a.root)))
    extra = f"- GPU: {name} (torch CUDA {cuda}); shardmerge runs with --device cuda"
    return do_compare(a, device="cuda", title=f"gpu ({name})", key_prefix="gpu", extra=extra)
