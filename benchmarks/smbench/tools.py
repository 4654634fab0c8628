"""The commands measured: copy floor, idle start-up, shardmerge, torchrun, PEFT, mergekit; and the check of
an output against W + s * B @ A computed independently here."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .common import BENCH, DEFAULT_MK_VENV, PROJECT, size_arg, tool_env
from .measure import Job


def job_copy(model: Path, group: str = "") -> Job:
    base = model / "base"

    def build(run: Path):
        out = run / "out"
        return ["cp", "-r", str(base), str(out)], out

    return Job(
        "copy floor (cp -r)" + (f" {group}" if group else ""),
        "copy",
        build,
        display=f"cp -r {base} OUT && sync",
        group=group,
    )


def job_idle(py: str, group: str = "") -> Job:
    def build(run: Path):
        return [py, "-c", "import torch, shardmerge"], None

    return Job(
        "idle start-up" + (f" {group}" if group else ""),
        "idle",
        build,
        display=f'{py} -c "import torch, shardmerge"',
        group=group,
    )


def job_shardmerge(py: str, model: Path, budget: int, budget_text: str, device: str = "cpu", group: str = "",
                   verify: bool = True) -> Job:  # fmt: skip
    plan = model / "plan.yaml"

    def build(run: Path):
        out = run / "out"
        cmd = [py, "-m", "shardmerge", str(plan), "--max-memory", budget_text, "--output", str(out),
               "--report-json", str(run / "report.json")]  # fmt: skip
        if device != "cpu":
            cmd += ["--device", device]
        return cmd, out

    name = f"shardmerge {budget_text}" + (f" {device}" if device != "cpu" else "") + (f" {group}" if group else "")
    return Job(
        name,
        "shardmerge",
        build,
        budget=budget,
        verify=verify,
        group=group,
        display=f"{py} -m shardmerge {plan} --max-memory {budget_text} --output OUT --report-json FILE"
        + (f" --device {device}" if device != "cpu" else "")
        + " && sync",
    )


def job_ranks(py: str, model: Path, n: int, budget_text: str) -> Job:
    plan = model / "plan.yaml"
    torchrun = Path(py).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [py, "-m", "torch.distributed.run"]

    def build(run: Path):
        out = run / "out"
        cmd = [*launcher, "--standalone", "--nproc_per_node", str(n), "-m", "shardmerge", str(plan),
               "--max-memory", budget_text, "--output", str(out), "--report-json", str(run / "report.json")]  # fmt: skip
        return cmd, out

    return Job(
        f"torchrun x{n}",
        "ranks",
        build,
        budget=size_arg(budget_text),
        poll=True,
        verify=True,
        display=f"torchrun --standalone --nproc_per_node {n} -m shardmerge {plan} --max-memory {budget_text} "
        "--output OUT --report-json FILE && sync",
    )


def job_peft(py: str, model: Path) -> Job:
    def build(run: Path):
        out = run / "out"
        return [py, str(BENCH), "_peft", "--base", str(model / "base"), "--adapter",
                str(model / "adapter"), "--out", str(out)], out  # fmt: skip

    return Job(
        "PEFT merge_and_unload",
        "peft",
        build,
        verify=True,
        display="AutoModelForCausalLM.from_pretrained(base, dtype=bf16) + PeftModel.from_pretrained + "
        "merge_and_unload + save_pretrained(OUT) && sync",
    )


def mergekit_yaml_bin(mkpy: str) -> list[str]:
    exe = Path(mkpy).parent / "mergekit-yaml"
    if exe.exists():
        return [str(exe)]
    return [mkpy, "-m", "mergekit.scripts.run_yaml"]


def job_mergekit(mkpy: str, model: Path) -> Job:
    def build(run: Path):
        out = run / "out"
        cfg = run / "mergekit.yml"
        cfg.write_text(
            f"models:\n  - model: {model / 'base'}+{model / 'adapter'}\nmerge_method: passthrough\ndtype: bfloat16\n"
        )
        cmd = [*mergekit_yaml_bin(mkpy), str(cfg), str(out), "--lora-merge-cache", str(run / "lora-cache"),
               "--lora-merge-dtype", "bfloat16", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]  # fmt: skip
        return cmd, out

    return Job(
        "mergekit base+lora",
        "mergekit",
        build,
        verify=True,
        display="mergekit-yaml {models: [{model: BASE+ADAPTER}], merge_method: passthrough, dtype: bfloat16} OUT "
        "--lora-merge-cache TMP --lora-merge-dtype bfloat16 --no-copy-tokenizer && sync",
    )


def find_mergekit(explicit: str | None) -> tuple[str | None, str | None]:
    """(python, version) of an installed mergekit, or (None, reason)."""
    cands = [explicit] if explicit else [os.environ.get("MERGEKIT_PYTHON"), str(DEFAULT_MK_VENV / "bin" / "python")]
    for c in filter(None, cands):
        if not Path(c).exists():
            continue
        r = subprocess.run([c, "-c", "import importlib.metadata as m, mergekit; print(m.version('mergekit'))"],
                           capture_output=True, text=True, env=tool_env())  # fmt: skip
        if r.returncode == 0:
            return c, r.stdout.strip()
    return None, "not installed"


def cmd_peft(a) -> int:
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch.bfloat16} if major >= 5 else {"torch_dtype": torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(a.base, **kw)
    model = PeftModel.from_pretrained(model, a.adapter)
    model = model.merge_and_unload()
    model.save_pretrained(a.out)
    return 0


def _st_tensors(d: Path) -> dict[str, Path]:
    """name -> file for the safetensors in a model dir (index when present, else headers)."""
    from shardmerge.safetensors_io import read_header

    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    return {name: f for f in sorted(d.glob("*.safetensors")) for name in read_header(f).tensors}


def cmd_verify(a) -> int:
    """Check a merged output against W + s * B @ A computed here in fp32 and rounded once."""
    sys.path.insert(0, str(PROJECT))
    import torch
    from safetensors import safe_open

    model, out = Path(a.model), Path(a.out)
    problems: list[str] = []
    base_map, out_map = _st_tensors(model / "base"), _st_tensors(out)
    acfg = json.loads((model / "adapter" / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg.get("use_rslora") else acfg["r"])
    missing = sorted(set(base_map) - set(out_map))
    extra = sorted(set(out_map) - set(base_map))
    if missing:
        problems.append(f"{len(missing)} tensors missing from output, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors in output, e.g. {extra[0]}")
    if not (out / "config.json").exists():
        problems.append("config.json not copied")
    if a.same_layout:
        bf = sorted(p.name for p in (model / "base").iterdir() if p.is_file())
        of = sorted(p.name for p in out.iterdir() if p.is_file())
        lost = sorted(set(bf) - set(of))
        if lost:
            problems.append(f"base files missing from output: {', '.join(lost[:4])}")
        if any(base_map[k].name != out_map[k].name for k in base_map if k in out_map):
            problems.append("tensor-to-shard layout differs from the base")
    layers = sorted({int(m.group(1)) for k in base_map if (m := re.match(r"model\.layers\.(\d+)\.", k))})
    keep = {layers[0], layers[-1]} if layers and not a.full else set(layers)
    names = [
        k
        for k in base_map
        if k in out_map and (not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) in keep)
    ]
    handles: dict[Path, object] = {}

    def get(path: Path, key: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    ad = safe_open(str(model / "adapter" / "adapter_model.safetensors"), framework="pt")
    akeys = set(ad.keys())
    merged = copied = 0
    worst_exact = 1.0
    max_excess = 0.0
    for k in names:
        w, o = get(base_map[k], k), get(out_map[k], k)
        if o.dtype != w.dtype or o.shape != w.shape:
            problems.append(f"{k}: {o.dtype}{tuple(o.shape)} != base {w.dtype}{tuple(w.shape)}")
            continue
        stem = "base_model.model." + k[: -len(".weight")]
        if stem + ".lora_A.weight" in akeys:
            A = ad.get_tensor(stem + ".lora_A.weight").float()
            B = ad.get_tensor(stem + ".lora_B.weight").float()
            exp32 = w.float() + scale * (B @ A)
            exp = exp32.to(w.dtype)
            diff = (o.float() - exp32).abs()
            # allowed: one rounding to the output dtype (half an ulp) plus fp32 accumulation-order slack
            ulp = torch.finfo(w.dtype).eps * exp32.abs().clamp_min(torch.finfo(w.dtype).tiny)
            excess = float((diff / ulp).max())
            max_excess = max(max_excess, excess)
            exact = float((o == exp).float().mean())
            worst_exact = min(worst_exact, exact)
            if excess > 1.01:
                problems.append(f"{k}: off by {excess:.1f} ulp from W + s*B@A (exact {exact:.4f})")
            if torch.equal(o, w):
                problems.append(f"{k}: adapter delta not applied")
            merged += 1
        else:
            if not torch.equal(
                o.view(torch.uint8) if o.dtype != torch.uint8 else o,
                w.view(torch.uint8) if w.dtype != torch.uint8 else w,
            ):
                problems.append(f"{k}: untouched tensor not byte-identical to the base")
            copied += 1
    res = dict(ok=not problems, problems=problems[:8], n_problems=len(problems), checked_merged=merged,
               checked_copied=copied, max_err_ulp=round(max_excess, 3), min_exact_fraction=round(worst_exact, 5))  # fmt: skip
    print(json.dumps(res))
    return 0


def check_shardmerge_ready(py: str) -> str | None:
    r = subprocess.run([py, "-c", "import shardmerge.runner, shardmerge.cli"], capture_output=True, text=True,
                       env=tool_env(), cwd=str(PROJECT))  # fmt: skip
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def job_rw_limit(model: Path) -> Job:
    """The disk's limit for a merge: read the whole base while O_DIRECT writes the same number of bytes
    (no page cache to absorb either side). A merge must do at least this much I/O."""
    files = sorted(str(p) for p in (model / "base").glob("*.safetensors"))
    total = sum(Path(f).stat().st_size for f in files)
    block = 64 * 2**20
    count = -(-total // block)

    def build(run: Path):
        out = run / "out"
        out.mkdir()
        script = (
            f"cat {' '.join(map(shlex.quote, files))} > /dev/null & "
            f"dd if=/dev/zero of={shlex.quote(str(out / 'fill'))} bs={block} count={count} oflag=direct "
            "status=none; wait"
        )
        return ["sh", "-c", script], out

    return Job(
        "read+write limit",
        "limit",
        build,
        display=f"cat BASE/*.safetensors > /dev/null & dd if=/dev/zero of=OUT bs=64M count={count} oflag=direct; "
        "wait && sync",
    )


def job_kernel_copy(model: Path) -> Job:
    """The best plain copier: copy_file_range of every base file (no user-space buffer) + fsync."""

    def build(run: Path):
        out = run / "out"
        return [sys.executable, str(BENCH), "_copy", "--src", str(model / "base"), "--out", str(out)], out

    return Job("copy floor (copy_file_range)", "copy", build, display="copy_file_range(each base file) && sync")


def cmd_copy(a) -> int:
    """Copy a directory's files with copy_file_range only (the wrapper syncs them)."""
    src, out = Path(a.src), Path(a.out)
    out.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        with open(f, "rb") as i, open(out / f.name, "wb") as o:
            size, done = os.fstat(i.fileno()).st_size, 0
            while done < size:
                done += os.copy_file_range(i.fileno(), o.fileno(), size - done, done, done)
    return 0
