"""`generate`: a synthetic model, its adapter and a plan.yaml."""

from __future__ import annotations

import json
from pathlib import Path

from ..common import DEFAULT_ROOT, size_arg
from ..synthetic import PROJECTIONS, SHAPES, generate_model, model_dir_for

NAME = "generate"
HELP = "write a synthetic model + adapter + plan.yaml"
ORDER = 0


def add_arguments(g) -> None:
    g.add_argument("--size-gb", type=float, required=True, help="approximate model size in GB (10^9 bytes)")
    g.add_argument("--out", help="model dir (default ROOT/model-<size>g)")
    g.add_argument("--root", default=str(DEFAULT_ROOT))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shape", default="auto", choices=["auto", *SHAPES], help="auto: largest shape giving >= 8 layers")
    g.add_argument("--layers", type=int, help="override the layer count")
    g.add_argument("--shard-size", help="max shard size, e.g. 500MB (default: total/4 clamped to 10MB..1GB)")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=int, default=32)
    g.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument(
        "--projections",
        default=",".join(PROJECTIONS),
        help="comma-separated projections the adapter targets (default: all seven; e.g. q_proj,v_proj)",
    )
    g.add_argument("--force", action="store_true", help="regenerate even if an identical model exists")


def run(a) -> int:
    projections = tuple(p for p in a.projections.split(",") if p)
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown or not projections:
        raise SystemExit(
            f"bench: --projections: {', '.join(unknown) or 'none given'}; choose from {', '.join(PROJECTIONS)}"
        )
    out = Path(a.out) if a.out else model_dir_for(a.size_gb, Path(a.root))
    meta = generate_model(out, a.size_gb, seed=a.seed, shape_name=a.shape, layers=a.layers,
                          shard_bytes=size_arg(a.shard_size) if a.shard_size else None, rank=a.rank, alpha=a.alpha,
                          adapter_dtype=a.adapter_dtype, force=a.force,
                          projections=projections)  # fmt: skip
    print(json.dumps(meta, indent=2))
    print(f"plan: {out / 'plan.yaml'}")
    return 0
