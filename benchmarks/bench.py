#!/usr/bin/env python3
"""shardmerge benchmark harness: `python benchmarks/bench.py MODE --help`. The code is the smbench package next to
this file (modes in smbench/modes/, one module each); see benchmarks/README.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
