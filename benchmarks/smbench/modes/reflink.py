"""`reflink`: what a merge costs on a filesystem that shares extents (XFS with reflink).

Makes an XFS image (`mkfs.xfs -m reflink=1`), loop-mounts it (root only), generates a model there with a
LoRA on q_proj and v_proj only, and measures, for `cp -r --reflink=never` (a full copy), `cp -r --reflink=always` (sharing everything) and shardmerge, the wall time
and how much the filesystem grew. shardmerge's output is compared byte for byte with the same merge written
to the ordinary filesystem under --work. The image is unmounted and deleted afterwards.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..common import MiB, fmt_s, log, rmtree, tool_env
from ..measure import Job, measure
from ..report import code_fingerprint, code_note, env_block, md_table, write_results
from ..synthetic import generate_model
from ..tools import job_shardmerge
from ._options import common

NAME = "reflink"
HELP = "XFS reflink image: filesystem growth and time of cp, cp --reflink and shardmerge for a q/v-only LoRA"
ORDER = 45
QV = ("q_proj", "v_proj")


def add_arguments(p) -> None:
    p.add_argument("--size-gb", type=float, default=2)
    p.add_argument("--image-gb", type=float, default=12, help="size of the sparse XFS image")
    p.add_argument("--budget", default="256MiB")
    common(p, runs=1)


def used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def mount_xfs(image: Path, mount: Path, size: int) -> str | None:
    """Make and mount the image; None, or why not."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        return "needs root and mkfs.xfs (apt-get install xfsprogs)"
    mount.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    for cmd in (
        ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)],
        ["mount", "-o", "loop", str(image), str(mount)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"{cmd[0]} failed: {done.stderr.strip()}"
    return None


def job_cp(model: Path, reflink: str) -> Job:
    """cp with an explicit --reflink (coreutils 9 defaults to auto, which shares extents too)."""

    def build(run: Path):
        return ["cp", "-r", f"--reflink={reflink}", str(model / "base"), str(run / "out")], run / "out"

    return Job(
        f"cp -r --reflink={reflink}", "copy", build, display=f"cp -r --reflink={reflink} {model / 'base'} OUT && sync"
    )


def run(a) -> int:
    root = Path(a.work) / "reflink"
    image, mount = root / "xfs.img", root / "xfs"
    rmtree(root)
    root.mkdir(parents=True)
    why = mount_xfs(image, mount, int(a.image_gb * 2**30))
    if why:
        print(f"bench reflink: {why}")
        return 2
    try:
        return _measure_all(a, mount, root)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        rmtree(root)


def _measure_all(a, mount: Path, root: Path) -> int:
    model = mount / "model"
    meta = generate_model(model, a.size_gb, seed=a.seed, projections=QV)
    merged = sum(2 * meta["hidden"] ** 2 for _ in range(meta["layers"]) for _ in QV)  # bf16 q and v, full MHA
    merge = job_shardmerge(a.python, model, 0, a.budget, verify=False)
    jobs = [job_cp(model, "never"), job_cp(model, "always"), merge]
    head = env_block(f"reflink: XFS (reflink=1) loop image, {model.name}", meta, model, a.python, None, None)
    fp = code_fingerprint()
    rows, log_dir = [], root / "logs"
    for job in jobs:
        for r in range(a.runs):
            run = mount / job.slug
            cmd, out = job.build(_fresh(run))
            before = used(mount)
            res = measure(cmd, run, f"{job.slug}-r{r}", log_dir, sync_dirs=[run], timeout=a.timeout)
            growth = used(mount) - before
            same = _same_as_elsewhere(a, model, out, root) if job is merge and r == 0 and res.ok else None
            rows.append(
                [
                    job.name,
                    fmt_s(res.wall_s) if res.ok else f"FAILED: {res.error}",
                    f"{growth / MiB:.0f}",
                    f"{growth / merged:.2f}",
                    "–" if same is None else ("yes" if same else "**NO**"),
                ]
            )
            rmtree(run)
    head += f"- {code_note(fp)}\n"
    table = md_table(
        ["tool", "wall s", "filesystem growth MiB", "× merged tensors' bytes", "shards identical to an ext4 run"], rows
    )
    body = (
        head + f"\nadapter on q_proj and v_proj only: {merged / MiB:.0f} MiB of tensors change out of "
        f"{meta['total_bytes'] / MiB:.0f} MiB; budget {a.budget}; growth is statvfs used blocks after a sync\n\n"
        + table
        + "\n\nCommands measured:\n\n"
        + "\n".join(f"- {j.name}: `{j.display}`" for j in jobs)
        + "\n"
    )
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"reflink:{a.size_gb:g}g", body)
    return 0


def _fresh(run: Path) -> Path:
    rmtree(run)
    run.mkdir(parents=True)
    time.sleep(0.3)
    return run


def _same_as_elsewhere(a, model: Path, out: Path, root: Path) -> bool:
    """The same plan written to the filesystem under --work (no extent sharing): identical shards?"""
    elsewhere = root / "elsewhere"
    subprocess.run(
        [
            a.python,
            "-m",
            "shardmerge",
            str(model / "plan.yaml"),
            "-q",
            "--max-memory",
            a.budget,
            "--output",
            str(elsewhere),
        ],
        check=True,
        env=tool_env(),
    )
    shards = sorted(p.name for p in elsewhere.glob("*.safetensors"))
    log(f"comparing {len(shards)} shards with {elsewhere}")
    same = bool(shards) and all(filecmp.cmp(out / n, elsewhere / n, shallow=False) for n in shards)
    rmtree(elsewhere)
    return same
