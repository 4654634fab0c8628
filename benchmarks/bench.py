#!/usr/bin/env python3
"""shardmerge benchmark harness: synthetic models, side-by-side timings, peak memory, RESULTS.md.

Modes (see benchmarks/README.md):
  generate  synthetic bf16 Llama-shaped model (sharded safetensors + index + config.json),
            a PEFT LoRA adapter (r=16 on all 7 projections) and a shardmerge plan.yaml
  compare   copy floor, idle start-up, shardmerge at several budgets, PEFT, mergekit; one
            invocation, tools interleaved per round, each measurement its own process
  sweep     model size vs wall time vs peak RSS at one fixed budget
  ranks     torchrun --nproc_per_node N -m shardmerge for several N
  gpu       the one command for a CUDA machine: generate a 16 GB model, copy floor vs device: cuda
  smoke     tiny end-to-end run of all of the above machinery (for CI)
  install-mergekit  make a separate venv with mergekit (never touches the project venv)

Measurement: every run is started by a tiny wrapper process (`bench.py _measure`) that spawns the
command, waits for it with wait4() and takes ru_maxrss from that child's own rusage, so the number is
the peak RSS of the measured process (the largest one in its tree), not of this script. After the
command exits the wrapper fsyncs every file it wrote (the "sync") inside the timed region. In `ranks`
mode the wrapper also polls the process tree with psutil every 20 ms and reports the summed RSS.
This file only imports the standard library at module level; torch etc. are imported where needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
DEFAULT_ROOT = Path(os.environ.get("SM_BENCH_ROOT", "/tmp/sm-bench"))
DEFAULT_RESULTS = HERE / "RESULTS.md"
DEFAULT_MK_VENV = Path("/tmp/mkvenv")
META_NAME = "bench-model.json"
GB = 10**9
MB = 10**6
MiB = 2**20

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-like shapes, largest first. `auto` takes the first that gives >= 8 layers for the requested
# size, so 2 GB -> hidden 2048 x 16 layers (the reference "1.7 GiB / 1.9 GB" model).
SHAPES = {
    "h4096": dict(hidden=4096, intermediate=11008, vocab=32000),
    "h2048": dict(hidden=2048, intermediate=5632, vocab=32000),
    "h1024": dict(hidden=1024, intermediate=2816, vocab=32000),
    "h512": dict(hidden=512, intermediate=1376, vocab=8000),
    "h256": dict(hidden=256, intermediate=688, vocab=4000),
}
MIN_AUTO_LAYERS = 8
BF16 = 2


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456, '2GB' -> 2000000000, bare numbers are bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 2GiB, 500MB)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def fmt_mb(nbytes: float | None) -> str:
    """Memory is reported in MiB throughout (budgets are given in MiB/GiB)."""
    return "–" if nbytes is None else f"{nbytes / MiB:.0f}"


def human(nbytes: float) -> str:
    for unit, div in (("GB", GB), ("MB", MB), ("KB", 10**3)):
        if abs(nbytes) >= div:
            return f"{nbytes / div:.2f} {unit}"
    return f"{nbytes:.0f} B"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def default_python() -> str:
    venv = PROJECT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def tool_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("HF_HOME", str(DEFAULT_ROOT / "hf-home"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


def global_sync() -> None:
    try:
        os.sync()
    except (AttributeError, OSError):
        subprocess.run(["sync"], check=False)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------


def layer_params(h: int, i: int) -> int:
    return 4 * h * h + 3 * h * i + 2 * h


def model_bytes(shape: dict, layers: int) -> int:
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    return BF16 * (2 * v * h + h + layers * layer_params(h, i))


def choose_shape(size_gb: float, shape_name: str = "auto", layers: int | None = None) -> tuple[str, dict, int]:
    target = size_gb * GB
    names = list(SHAPES) if shape_name == "auto" else [shape_name]
    for name in names:
        shape = SHAPES[name]
        fixed = model_bytes(shape, 0)
        per = BF16 * layer_params(shape["hidden"], shape["intermediate"])
        n = layers if layers else max(1, int((target - fixed) // per))
        if shape_name != "auto" or layers or n >= MIN_AUTO_LAYERS or name == names[-1]:
            return name, shape, n
    raise AssertionError("unreachable")


def tensor_specs(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in the order transformers writes a LlamaForCausalLM."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (h, h), "normal"),
            (p + "self_attn.v_proj.weight", (h, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "mlp.gate_proj.weight", (i, h), "normal"),
            (p + "mlp.up_proj.weight", (i, h), "normal"),
            (p + "mlp.down_proj.weight", (h, i), "normal"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "normal")]
    return specs


def seeded(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def make_tensor(name: str, shp: tuple[int, ...], init: str, seed: int, dtype, std: float = 0.02):
    import torch

    t = torch.empty(shp, dtype=dtype)
    t.normal_(0.0, std, generator=seeded(seed, name))
    if init == "norm":
        t.add_(1.0)
    return t


def write_config(base: Path, shape: dict, layers: int) -> None:
    h = shape["hidden"]
    heads = max(1, h // 128)
    fields = dict(
        hidden_size=h, intermediate_size=shape["intermediate"], num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=shape["vocab"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )  # fmt: skip
    try:
        from transformers import LlamaConfig

        cfg = LlamaConfig(**fields)
        cfg.architectures = ["LlamaForCausalLM"]
        try:
            cfg.dtype = "bfloat16"
        except Exception:  # older transformers
            cfg.torch_dtype = "bfloat16"
        cfg.save_pretrained(base)
    except ImportError:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **fields}
        (base / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")


def write_adapter(adir: Path, base: Path, shape: dict, layers: int, seed: int, rank: int, alpha: int, dtype_name: str):
    import torch
    from safetensors.torch import save_file

    adir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    h, i = shape["hidden"], shape["intermediate"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)  # fmt: skip
    tensors = {}
    for n in range(layers):
        for proj in PROJECTIONS:
            sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{n}.{sub}.{proj}"
            fan_in, fan_out = dims[proj]
            tensors[key + ".lora_A.weight"] = make_tensor(key + ".A", (rank, fan_in), "normal", seed, dtype, 0.02)
            tensors[key + ".lora_B.weight"] = make_tensor(key + ".B", (fan_out, rank), "normal", seed, dtype, 0.02)
    save_file(tensors, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = None
    try:
        from peft import LoraConfig

        lc = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(PROJECTIONS), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base))  # fmt: skip
        lc.save_pretrained(str(adir))
        cfg = json.loads((adir / "adapter_config.json").read_text())
    except ImportError:
        pass
    if cfg is None:
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
               "target_modules": list(PROJECTIONS), "lora_dropout": 0.0, "bias": "none",
               "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
               "base_model_name_or_path": str(base), "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "inference_mode": True}  # fmt: skip
        (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == alpha
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_plan(path: Path, max_memory: str = "2GiB", device: str = "cpu", output: str = "./merged") -> None:
    path.write_text(
        "# shardmerge plan written by benchmarks/bench.py generate\n"
        "base: ./base\n"
        "adapters:\n"
        "  - path: ./adapter\n"
        "    weight: 1.0\n"
        f"output: {output}\n"
        f"max_memory: {max_memory}\n"
        f"device: {device}\n"
    )


def generate_model(out: Path, size_gb: float, seed: int = 0, shape_name: str = "auto", layers: int | None = None,
                   shard_bytes: int | None = None, rank: int = 16, alpha: int = 32, adapter_dtype: str = "float32",
                   force: bool = False) -> dict:  # fmt: skip
    """Generate (or reuse, when the same parameters were already generated) a model dir; return its meta."""
    name, shape, n_layers = choose_shape(size_gb, shape_name, layers)
    specs = tensor_specs(shape, n_layers)
    total = sum(BF16 * math.prod(s) for _, s, _ in specs)
    if shard_bytes is None:  # about 4 shards, clamped to 10 MB .. 1 GB
        shard_bytes = int(min(GB, max(10 * MB, total / 4)))
    wanted = dict(shape=name, **shape, layers=n_layers, seed=seed, shard_bytes=shard_bytes, rank=rank,
                  lora_alpha=alpha, adapter_dtype=adapter_dtype, version=1)  # fmt: skip
    meta_path = out / META_NAME
    if meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            log(f"reusing {out} ({human(meta['total_bytes'])}, {meta['layers']} layers, {meta['shards']} shards)")
            return meta
    if out.exists():
        if any(out.iterdir()) and not meta_path.exists() and not force:
            raise SystemExit(f"bench: {out} exists, is not empty and was not made by bench.py; pass --force or pick another --out")
        rmtree(out)
    import torch
    from safetensors.torch import save_file

    log(f"generating {out}: shape {name} x {n_layers} layers, {human(total)} bf16, seed {seed}")
    t0 = time.perf_counter()
    base = out / "base"
    base.mkdir(parents=True)
    # Group tensors into shards (a new shard starts when the next tensor would overflow).
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = BF16 * math.prod(spec[1])
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    n_shards = len(groups)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if n_shards == 1 else f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {nm: make_tensor(nm, shp, init, seed, torch.bfloat16) for nm, shp, init in group}
        save_file(tensors, str(base / fname), metadata={"format": "pt"})
        del tensors  # one shard in RAM at a time
        for nm, _, _ in group:
            weight_map[nm] = fname
        log(f"  wrote {fname} ({len(group)} tensors)")
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(base, shape, n_layers)
    adapter_bytes = write_adapter(out / "adapter", base, shape, n_layers, seed, rank, alpha, adapter_dtype)
    write_plan(out / "plan.yaml")
    meta = dict(wanted, total_bytes=total, shards=n_shards, adapter_bytes=adapter_bytes,
                base_dir_bytes=dir_bytes(base), generated_s=round(time.perf_counter() - t0, 1),
                created=_dt.datetime.now().isoformat(timespec="seconds"))  # fmt: skip
    global_sync()
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the model complete
    log(f"generated {out} in {meta['generated_s']} s: {n_shards} shards, adapter {human(adapter_bytes)}")
    return meta


def load_meta(model: Path) -> dict:
    p = model / META_NAME
    if not p.exists():
        raise SystemExit(f"bench: {model} is not a generated benchmark model (no {META_NAME}); run `bench.py generate` or pass --size-gb")
    return json.loads(p.read_text())


def model_dir_for(size_gb: float, root: Path = DEFAULT_ROOT, prefix: str = "model") -> Path:
    return root / f"{prefix}-{size_gb:g}g"


# ----------------------------------------------------------------------------------------------
# the measuring wrapper (runs as its own small process)
# ----------------------------------------------------------------------------------------------


def fsync_tree(path: Path) -> int:
    n = 0
    if not path.exists():
        return 0
    for root, dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                n += 1
            except OSError:
                pass
        try:
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    return n


def cmd_measure(a) -> int:
    import resource
    import signal

    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    wrapper_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logf = open(a.log, "ab", buffering=0)
    logf.write(("$ " + shlex.join(cmd) + "\n").encode())
    peak_tree = [0]
    stop = threading.Event()
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ),
                          file_actions=[(os.POSIX_SPAWN_DUP2, logf.fileno(), 1), (os.POSIX_SPAWN_DUP2, logf.fileno(), 2)],
                          setpgroup=0)  # fmt: skip

    def poll():
        import psutil

        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            total = 0
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak_tree[0] = max(peak_tree[0], total)
            stop.wait(a.poll_interval)

    poller = threading.Thread(target=poll, daemon=True) if a.poll else None
    if poller:
        poller.start()
    timed_out = [False]

    def kill():
        timed_out[0] = True
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(a.timeout, kill) if a.timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    _, status, ru = os.wait4(pid, 0)
    t1 = time.perf_counter()
    if timer:
        timer.cancel()
    stop.set()
    if poller:
        poller.join()
    rc = os.waitstatus_to_exitcode(status)
    synced = 0
    if rc == 0:
        if a.global_sync:
            global_sync()
        for d in a.sync:
            synced += fsync_tree(Path(d))
    t2 = time.perf_counter()
    out_bytes = sum(dir_bytes(Path(d)) for d in a.count) if rc == 0 else 0
    res = dict(rc=rc, timed_out=timed_out[0], wall_s=t2 - t0, cmd_s=t1 - t0, sync_s=t2 - t1,
               maxrss_bytes=ru.ru_maxrss * 1024, tree_peak_rss_bytes=peak_tree[0] or None,
               wrapper_maxrss_bytes=wrapper_rss, utime_s=ru.ru_utime, stime_s=ru.ru_stime,
               files_synced=synced, out_bytes=out_bytes, cmd=cmd)  # fmt: skip
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def measure(cmd: list[str], run_dir: Path, tag: str, log_dir: Path, *, sync_dirs=(), count_dirs=(), poll=False,
            timeout: float = 3600, cwd: Path = PROJECT, env=None) -> dict:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{tag}.log"
    json_path = log_dir / f"{tag}.json"
    wrapper = [sys.executable, str(Path(__file__).resolve()), "_measure", "--json", str(json_path), "--log", str(log_path),
               "--timeout", str(timeout)]  # fmt: skip
    for d in sync_dirs:
        wrapper += ["--sync", str(d)]
    for d in count_dirs:
        wrapper += ["--count", str(d)]
    if poll:
        wrapper += ["--poll"]
    wrapper += ["--", *cmd]
    subprocess.run(wrapper, cwd=str(cwd), env=env or tool_env(), check=False)
    try:
        res = json.loads(json_path.read_text())
    except (OSError, ValueError):
        res = dict(rc=-999, wall_s=None, maxrss_bytes=None, cmd=cmd)
    res["log"] = str(log_path)
    if res.get("rc") != 0:
        res["error"] = last_error_line(log_path, res)
    return res


def last_error_line(log_path: Path, res: dict) -> str:
    if res.get("timed_out"):
        return "timed out"
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = [ln for ln in lines if not ln.startswith("$ ") and "Warning" not in ln[:40]]
    msg = lines[-1] if lines else f"exit {res.get('rc')}"
    return (msg[:160] + "…") if len(msg) > 160 else msg


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------


class Job:
    """One tool configuration measured once per round. `build(run_dir)` returns (cmd, out_dir)."""

    def __init__(self, name: str, kind: str, build, budget: int | None = None, display: str | None = None,
                 poll: bool = False, verify: bool = False, group: str = ""):  # fmt: skip
        self.name, self.kind, self.build, self.budget = name, kind, build, budget
        self.display = display
        self.poll, self.verify, self.group = poll, verify, group
        self.results: list[dict] = []
        self.failed: str | None = None
        self.verified: dict | None = None
        self.retried: list[str] = []

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-").lower()


def job_copy(model: Path, group: str = "") -> Job:
    base = model / "base"

    def build(run: Path):
        out = run / "out"
        return ["cp", "-r", str(base), str(out)], out

    return Job("copy floor" + (f" {group}" if group else ""), "copy", build,
               display=f"cp -r {base} OUT && sync", group=group)  # fmt: skip


def job_idle(py: str, group: str = "") -> Job:
    def build(run: Path):
        return [py, "-c", "import torch, shardmerge"], None

    return Job("idle start-up" + (f" {group}" if group else ""), "idle", build,
               display=f'{py} -c "import torch, shardmerge"', group=group)  # fmt: skip


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
    return Job(name, "shardmerge", build, budget=budget, verify=verify, group=group,
               display=f"{py} -m shardmerge {plan} --max-memory {budget_text} --output OUT --report-json FILE"
               + (f" --device {device}" if device != "cpu" else "") + " && sync")  # fmt: skip


def job_ranks(py: str, model: Path, n: int, budget_text: str) -> Job:
    plan = model / "plan.yaml"
    torchrun = Path(py).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [py, "-m", "torch.distributed.run"]

    def build(run: Path):
        out = run / "out"
        cmd = [*launcher, "--standalone", "--nproc_per_node", str(n), "-m", "shardmerge", str(plan),
               "--max-memory", budget_text, "--output", str(out), "--report-json", str(run / "report.json")]  # fmt: skip
        return cmd, out

    return Job(f"torchrun x{n}", "ranks", build, budget=parse_size(budget_text), poll=True, verify=True,
               display=f"torchrun --standalone --nproc_per_node {n} -m shardmerge {plan} --max-memory {budget_text} "
               "--output OUT --report-json FILE && sync")  # fmt: skip


def job_peft(py: str, model: Path) -> Job:
    def build(run: Path):
        out = run / "out"
        return [py, str(Path(__file__).resolve()), "_peft", "--base", str(model / "base"), "--adapter",
                str(model / "adapter"), "--out", str(out)], out  # fmt: skip

    return Job("PEFT merge_and_unload", "peft", build, verify=True,
               display="AutoModelForCausalLM.from_pretrained(base, dtype=bf16) + PeftModel.from_pretrained + "
               "merge_and_unload + save_pretrained(OUT) && sync")  # fmt: skip


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
            "models:\n"
            f"  - model: {model / 'base'}+{model / 'adapter'}\n"
            "merge_method: passthrough\n"
            "dtype: bfloat16\n"
        )
        cmd = [*mergekit_yaml_bin(mkpy), str(cfg), str(out), "--lora-merge-cache", str(run / "lora-cache"),
               "--lora-merge-dtype", "bfloat16", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]  # fmt: skip
        return cmd, out

    return Job("mergekit base+lora", "mergekit", build, verify=True,
               display="mergekit-yaml {models: [{model: BASE+ADAPTER}], merge_method: passthrough, dtype: bfloat16} OUT "
               "--lora-merge-cache TMP --lora-merge-dtype bfloat16 --no-copy-tokenizer && sync")  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# helper modes run inside measured / separate processes
# ----------------------------------------------------------------------------------------------


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
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
        for k in hdr:
            if k != "__metadata__":
                out[k] = f
    return out


def cmd_verify(a) -> int:
    """Check a merged output against W + s * B @ A computed here in fp32 and rounded once."""
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
    names = [k for k in base_map if k in out_map and (not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) in keep)]
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
            if not torch.equal(o.view(torch.uint8) if o.dtype != torch.uint8 else o, w.view(torch.uint8) if w.dtype != torch.uint8 else w):
                problems.append(f"{k}: untouched tensor not byte-identical to the base")
            copied += 1
    res = dict(ok=not problems, problems=problems[:8], n_problems=len(problems), checked_merged=merged,
               checked_copied=copied, max_err_ulp=round(max_excess, 3), min_exact_fraction=round(worst_exact, 5))  # fmt: skip
    print(json.dumps(res))
    return 0


def verify_output(py: str, model: Path, out: Path, same_layout: bool, full: bool = False) -> dict:
    cmd = [py, str(Path(__file__).resolve()), "_verify", "--model", str(model), "--out", str(out)]
    if same_layout:
        cmd.append("--same-layout")
    if full:
        cmd.append("--full")
    r = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), cwd=str(PROJECT))
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return dict(ok=False, problems=[f"verifier crashed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"])


# ----------------------------------------------------------------------------------------------
# running rounds
# ----------------------------------------------------------------------------------------------


def run_rounds(jobs: list[Job], runs: int, work: Path, log_dir: Path, py: str, models: dict[str, Path],
               timeout: float, verify: bool, verify_full: bool = False, retries: int = 1) -> None:  # fmt: skip
    """Each round runs every job once, in an order rotated by the round number.

    A failed run is retried `retries` times (fresh output dir) before the tool is marked failed and
    skipped in later rounds; the retry is noted in the table.
    """
    for r in range(runs):
        order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]
        for job in order:
            if job.failed:
                continue
            for attempt in range(retries + 1):
                run = work / job.slug
                rmtree(run)
                run.mkdir(parents=True)
                global_sync()  # untimed: flush earlier runs' dirty pages so they do not land in this one
                time.sleep(0.3)
                cmd, out = job.build(run)
                log(f"round {r + 1}/{runs}: {job.name}" + (f" (retry {attempt})" if attempt else ""))
                tag = f"{job.slug}-r{r + 1}" + (f"-retry{attempt}" if attempt else "")
                res = measure(cmd, run, tag, log_dir, sync_dirs=[run] if out else [],
                              count_dirs=[out] if out else [], poll=job.poll, timeout=timeout)  # fmt: skip
                if res.get("rc") == 0 or attempt == retries:
                    break
                job.retried.append(f"round {r + 1}: {res.get('error')}")
                log(f"  failed ({res.get('error')}); retrying")
                rmtree(run)
                time.sleep(2)
            if res.get("rc") == 0:
                rep = run / "report.json"
                if rep.exists():
                    try:
                        res["report"] = json.loads(rep.read_text())
                    except ValueError:
                        res["report"] = None
                extra = f", peak RSS {fmt_mb(res.get('maxrss_bytes'))} MiB"
                log(f"  {res['wall_s']:.2f} s (cmd {res['cmd_s']:.2f} + sync {res['sync_s']:.2f}){extra}")
                if verify and job.verify and out and job.verified is None:
                    model = models.get(job.group) or models[""]
                    job.verified = verify_output(py, model, out, same_layout=job.kind in ("shardmerge", "ranks"),
                                                 full=verify_full)  # fmt: skip
                    v = job.verified
                    log(f"  verify: {'ok' if v.get('ok') else 'FAILED'} {json.dumps(v)[:300]}")
                job.results.append(res)
            else:
                job.failed = res.get("error") or f"exit {res.get('rc')}"
                log(f"  FAILED ({job.failed}); log: {res['log']}")
            rmtree(run)


# ----------------------------------------------------------------------------------------------
# summaries, tables, RESULTS.md
# ----------------------------------------------------------------------------------------------

STAGES = ("read", "merge", "write", "copy", "hash")


def report_stages(report: dict | None) -> dict[str, float]:
    if not isinstance(report, dict):
        return {}
    for key in ("stage_seconds", "stages", "stage_busy_seconds", "busy_seconds"):
        v = report.get(key)
        if isinstance(v, dict):
            return {k: float(x) for k, x in v.items() if isinstance(x, (int, float))}
    return {k[: -len("_seconds")]: float(v) for k, v in report.items()
            if k.endswith("_seconds") and isinstance(v, (int, float)) and k[: -len("_seconds")] in STAGES}  # fmt: skip


def report_peaks(report: dict | None) -> dict[str, float]:
    if not isinstance(report, dict):
        return {}
    out = {}
    for k, v in report.items():
        if "peak" in k and isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict) and "peak" in k:
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
    return out


def summarize(job: Job) -> dict:
    rs = job.results
    s = dict(name=job.name, kind=job.kind, budget=job.budget, n=len(rs), failed=job.failed, verified=job.verified,
             display=job.display, group=job.group, retried=job.retried)  # fmt: skip
    if not rs:
        return s
    walls = [r["wall_s"] for r in rs]
    s.update(wall=median(walls), wall_min=min(walls), wall_max=max(walls), cmd=median([r["cmd_s"] for r in rs]),
             sync=median([r["sync_s"] for r in rs]), rss=median([r["maxrss_bytes"] for r in rs]),
             rss_max=max(r["maxrss_bytes"] for r in rs), tree_rss=median([r.get("tree_peak_rss_bytes") for r in rs]),
             out_bytes=median([r.get("out_bytes") for r in rs]), cpu=median([r["utime_s"] + r["stime_s"] for r in rs]),
             wrapper_rss=median([r.get("wrapper_maxrss_bytes") for r in rs]))  # fmt: skip
    stages: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    for r in rs:
        for k, v in report_stages(r.get("report")).items():
            stages.setdefault(k, []).append(v)
        for k, v in report_peaks(r.get("report")).items():
            peaks.setdefault(k, []).append(v)
    s["stages"] = {k: median(v) for k, v in stages.items()}
    s["report_seconds"] = median([r["report"].get("seconds") for r in rs if isinstance(r.get("report"), dict)])
    s["peaks"] = {k: median(v) for k, v in peaks.items()}
    s["has_report"] = any(r.get("report") is not None for r in rs)
    return s


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def verify_note(s: dict) -> str:
    v = s.get("verified")
    if not v:
        return ""
    if v.get("ok"):
        return f"verified vs fp32 W+sBA (max {v.get('max_err_ulp')} ulp, exact {v.get('min_exact_fraction')})"
    return "VERIFY FAILED: " + "; ".join(v.get("problems", [])[:3])


def compare_tables(sums: list[dict], idle: dict | None, copy: dict | None) -> str:
    idle_wall = idle.get("wall") if idle else None
    idle_rss = idle.get("rss") if idle else None
    copy_wall = copy.get("wall") if copy else None
    rows = []
    for s in sums:
        if s.get("failed") and not s.get("n"):
            note = ("not installed" if s["failed"] == "not installed" else f"FAILED: {s['failed']}")
            rows.append([s["name"], "–", "–", "–", "–", "–", "–", note])
            continue
        wall = s.get("wall")
        notes = []
        minus = ratio = above = None
        if s["kind"] == "copy":
            ratio = 1.0
            notes.append(f"cp {fmt_s(s.get('cmd'))} s + sync {fmt_s(s.get('sync'))} s")
        elif s["kind"] == "idle":
            notes.append("reported separately; subtracted from shardmerge rows")
        else:
            if idle_wall is not None and s["kind"] in ("shardmerge", "ranks"):
                minus = wall - idle_wall
            base_for_ratio = minus if minus is not None else wall
            ratio = base_for_ratio / copy_wall if copy_wall else None
            if idle_rss is not None and s.get("rss") is not None:
                above = s["rss"] - idle_rss
            if s["kind"] == "shardmerge" and s.get("budget"):
                b = s["budget"]
                if above is not None:
                    worst = s["rss_max"] - idle_rss
                    notes.append(f"RSS above idle {above / MiB:.0f} MiB (worst run {worst / MiB:.0f}) = "
                                 f"{above / b:.2f}x budget {b / MiB:.0f} MiB"
                                 + (" **OVER BUDGET**" if worst > b else ""))  # fmt: skip
                if not s.get("has_report"):
                    notes.append("no --report-json file")
            if s.get("sync") and s["sync"] > 0.05:
                notes.append(f"sync {fmt_s(s['sync'])} s")
        if s.get("n", 0) > 1:
            notes.insert(0, f"range {fmt_s(s['wall_min'])}–{fmt_s(s['wall_max'])} s")
        if s.get("failed"):
            notes.append(f"later run FAILED: {s['failed']}")
        if s.get("retried"):
            notes.append(f"{len(s['retried'])} run(s) retried after: {s['retried'][0]}")
        vn = verify_note(s)
        if vn:
            notes.append(vn)
        rows.append([s["name"], fmt_s(wall), fmt_s(minus), ("–" if ratio is None else f"{ratio:.2f}"),
                     fmt_mb(s.get("rss")), fmt_mb(above), f"{s['n']}", "; ".join(notes)])  # fmt: skip
    t = md_table(["tool", "median wall s", "wall − start-up s", "× copy floor", "peak RSS MiB", "RSS above idle MiB",
                  "runs", "notes"], rows)  # fmt: skip
    stage_rows = []
    keys: list[str] = []
    for s in sums:
        for k in s.get("stages") or {}:
            if k not in keys:
                keys.append(k)
    keys = [k for k in STAGES if k in keys] + [k for k in keys if k not in STAGES]
    for s in sums:
        if s.get("stages"):
            peaks = ", ".join(f"{k}={human(v) if v > 10_000 else v}" for k, v in (s.get("peaks") or {}).items())
            stage_rows.append([s["name"], fmt_s(s.get("report_seconds")), *[fmt_s(s["stages"].get(k)) for k in keys],
                               peaks or "–"])  # fmt: skip
    if stage_rows:
        t += "\n\nshardmerge per-stage busy seconds (median, from --report-json; stages overlap, so they can add up to more than wall):\n\n"
        t += md_table(["run", "report seconds", *keys, "report peaks (median)"], stage_rows)
    return t


def machine_info(path: Path) -> dict:
    info = {"host": platform.node(), "kernel": platform.release()}
    cpu = "?"
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemTotal"):
                info["ram"] = f"{int(ln.split()[1]) * 1024 / 2**30:.1f} GiB"
    except OSError:
        pass
    try:
        info["load_avg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    # disk holding `path`: mount, fs type, device, rotational flag, free space
    p = path
    while not p.exists():
        p = p.parent
    best = ("", "?", "?")
    try:
        for ln in open("/proc/mounts"):
            dev, mnt, fstype = ln.split()[:3]
            if str(p.resolve()).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    du = shutil.disk_usage(p)
    disk = f"{best[2]} ({best[1]}) mounted at {best[0]}, {du.total / 2**30:.0f} GiB, {du.free / 2**30:.0f} GiB free"
    devname = os.path.basename(best[2])
    base = re.sub(r"p?\d+$", "", devname) if not devname.startswith("nvme") else re.sub(r"p\d+$", "", devname)
    for cand in (devname, base):
        rot = Path(f"/sys/block/{cand}/queue/rotational")
        if rot.exists():
            disk += ", " + ("rotational" if rot.read_text().strip() == "1" else "non-rotational")
            break
    info["disk"] = disk
    return info


def versions(py: str, mkpy: str | None, mkver: str | None) -> dict:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "v = {'python': sys.version.split()[0]}\n"
        "for n in ('torch', 'peft', 'transformers', 'safetensors', 'shardmerge'):\n"
        "    try: v[n] = m.version(n)\n"
        "    except Exception: v[n] = 'not installed'\n"
        "try:\n    import shardmerge; v['shardmerge'] = shardmerge.__version__\n"
        "except Exception as e: v['shardmerge'] += f' (import failed: {e})'\n"
        "print(json.dumps(v))\n"
    )
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=tool_env(), cwd=str(PROJECT))
    try:
        v = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        v = {"python": "?"}
    try:
        rev = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--", "shardmerge"],
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
            v["shardmerge"] += f" (git {rev.stdout.strip()}{', uncommitted changes' if dirty else ''})"
        else:
            v["shardmerge"] += " (no git commit yet)"
    except OSError:
        pass
    if mkpy or mkver:  # (None, None): mergekit is not part of this mode
        v["mergekit"] = mkver if mkpy else "not installed"
    if mkpy:
        r = subprocess.run([mkpy, "-c", "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"],
                           capture_output=True, text=True, env=tool_env())  # fmt: skip
        if r.returncode == 0:
            t, tr, pe = r.stdout.split()
            v["mergekit"] += f" (its venv: torch {t}, transformers {tr}, peft {pe})"
    return v


def code_fingerprint() -> str:
    """Hash of shardmerge/*.py as they are on disk now: to notice the code changing under a benchmark."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((PROJECT / "shardmerge").rglob("*.py")):
        try:
            h.update(f.relative_to(PROJECT).as_posix().encode() + b"\0" + f.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:12]


def code_note(start_fp: str) -> str:
    end_fp = code_fingerprint()
    if end_fp == start_fp:
        return f"shardmerge source fingerprint {start_fp} (unchanged during the benchmark)"
    log("WARNING: shardmerge's source changed while the benchmark ran; numbers mix versions")
    return (f"**WARNING: shardmerge's source changed during this benchmark** (fingerprint {start_fp} -> {end_fp}); "
            "runs mix code versions, re-run for clean numbers")


def the_command() -> str:
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, Path.cwd()) if Path(exe).is_relative_to(Path.cwd()) else exe
    except (ValueError, AttributeError):
        pass
    args = [exe, os.path.relpath(__file__, Path.cwd()) if Path(__file__).resolve().is_relative_to(Path.cwd()) else __file__,
            *sys.argv[1:]]  # fmt: skip
    return shlex.join(args)


RESULTS_HEADER = """# shardmerge benchmark results

Written by `benchmarks/bench.py` (see `benchmarks/README.md` for the method). Each section is
replaced when the same mode is re-run on the same model; sections for other modes/models are kept.
Every number is the median over the runs; each run is its own process, measured from outside by a
small wrapper: wall time includes an fsync of every output file ("sync"), and peak RSS is the
measured process's own `ru_maxrss` (from `wait4`), never this script's. Files are read from a warm
page cache (the base model fits in RAM), so the copy floor is "write the model once and fsync it".
"""


def write_results(path: Path, key: str, body: str) -> None:
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        post = post.lstrip("\n")
        text = pre + section + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"results written to {path} (section {key})")


def env_block(title: str, model_meta: dict | None, model: Path | None, py: str, mkpy, mkver, extra: str = "") -> str:
    m = machine_info(model or DEFAULT_ROOT)
    v = versions(py, mkpy, mkver)
    lines = [f"## {title}", "", f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- machine: {m['cpu']}, {m['cores']} cores ({m.get('usable_cores', '?')} usable), {m.get('ram', '?')} RAM, "
             f"load avg at start {m.get('load_avg', '?')}; kernel {m['kernel']}",
             f"- disk: {m['disk']}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- command: `{the_command()}`"]  # fmt: skip
    if model_meta and model:
        mm = model_meta
        lines.append(f"- model: `{model}`: synthetic Llama shape hidden {mm['hidden']}, intermediate {mm['intermediate']}, "
                     f"vocab {mm['vocab']}, {mm['layers']} layers, {human(mm['total_bytes'])} bf16 "
                     f"({mm['total_bytes'] / 2**30:.2f} GiB) in {mm['shards']} shards; adapter r={mm['rank']}, "
                     f"alpha={mm['lora_alpha']} on all 7 projections ({mm['adapter_dtype']}, {human(mm['adapter_bytes'])})")  # fmt: skip
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------


def ensure_model(model: Path | None, size_gb: float | None, seed: int, shape: str = "auto", root: Path = DEFAULT_ROOT) -> tuple[Path, dict]:
    if model is None:
        if size_gb is None:
            raise SystemExit("bench: pass --model DIR or --size-gb N")
        model = model_dir_for(size_gb, root)
    if size_gb is not None and not (model / META_NAME).exists():
        generate_model(model, size_gb, seed=seed, shape_name=shape)
    return model, load_meta(model)


def build_compare_jobs(a, model: Path, py: str, device: str) -> tuple[list[Job], str | None, str | None]:
    tools = set(csv_list(a.tools))
    jobs = []
    if "copy" in tools:
        jobs.append(job_copy(model))
    if "idle" in tools or "shardmerge" in tools:
        jobs.append(job_idle(py))
    if "shardmerge" in tools:
        for b in csv_list(a.budgets):
            jobs.append(job_shardmerge(py, model, parse_size(b), b, device=device))
    if "peft" in tools:
        jobs.append(job_peft(py, model))
    mkpy, mkver = (None, None)
    if "mergekit" in tools:
        mkpy, mkver = find_mergekit(a.mergekit_python)
        if mkpy:
            jobs.append(job_mergekit(mkpy, model))
        else:
            j = Job("mergekit base+lora", "mergekit", None)
            j.failed = "not installed"
            jobs.append(j)
    return jobs, mkpy, mkver


def check_shardmerge_ready(py: str) -> str | None:
    r = subprocess.run([py, "-c", "import shardmerge.runner, shardmerge.cli"], capture_output=True, text=True,
                       env=tool_env(), cwd=str(PROJECT))  # fmt: skip
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return None


def do_compare(a, device: str = "cpu", title: str = "compare", key_prefix: str = "compare", extra: str = "") -> int:
    py = a.python
    model, meta = ensure_model(Path(a.model) if a.model else None, a.size_gb, a.seed)
    not_ready = check_shardmerge_ready(py)
    if not_ready:
        log(f"warning: shardmerge not importable yet ({not_ready}); its rows will show the failure")
    jobs, mkpy, mkver = build_compare_jobs(a, model, py, device)
    runnable = [j for j in jobs if not j.failed]
    work = Path(a.work) / key_prefix
    log_dir = Path(a.work) / "logs" / f"{key_prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"{title}: {len(runnable)} tools x {a.runs} runs on {model} ({human(meta['total_bytes'])}); logs in {log_dir}")
    head = env_block(f"{title}: {model.name}", meta, model, py, mkpy, mkver, extra)
    fp = code_fingerprint()
    run_rounds(runnable, a.runs, work, log_dir, py, {"": model}, a.timeout, verify=not a.no_verify, verify_full=a.verify_full, retries=a.retries)
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = [summarize(j) for j in jobs]
    idle = next((s for s in sums if s["kind"] == "idle"), None)
    copy = next((s for s in sums if s["kind"] == "copy"), None)
    table = compare_tables(sums, idle, copy)
    cmds = "\n".join(f"- {s['name']}: `{s['display']}`" for s in sums if s.get("display"))
    body = head + f"\nruns per tool: {a.runs} (interleaved, order rotated each round)\n\n" + table + "\n\nCommands measured:\n\n" + cmds + "\n"
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"{key_prefix}:{model.name}", body)
    bad = [s for s in sums if (s.get("failed") and s["failed"] != "not installed") or (s.get("verified") and not s["verified"].get("ok"))]
    return 1 if (bad and a.strict) else 0


def cmd_generate(a) -> int:
    out = Path(a.out) if a.out else model_dir_for(a.size_gb, Path(a.root))
    meta = generate_model(out, a.size_gb, seed=a.seed, shape_name=a.shape, layers=a.layers,
                          shard_bytes=parse_size(a.shard_size) if a.shard_size else None, rank=a.rank, alpha=a.alpha,
                          adapter_dtype=a.adapter_dtype, force=a.force)  # fmt: skip
    print(json.dumps(meta, indent=2))
    print(f"plan: {out / 'plan.yaml'}")
    return 0


def cmd_compare(a) -> int:
    return do_compare(a)


def cmd_sweep(a) -> int:
    py = a.python
    sizes = [float(x) for x in csv_list(a.sizes)]
    models = {}
    metas = {}
    for sz in sizes:
        g = f"{sz:g}GB"
        m = model_dir_for(sz, Path(a.root), prefix=f"sweep-{a.shape}")
        metas[g] = generate_model(m, sz, seed=a.seed, shape_name=a.shape)
        models[g] = m
    jobs = [job_idle(py)]
    for g, m in models.items():
        if not a.no_copy:
            jobs.append(job_copy(m, group=g))
        jobs.append(job_shardmerge(py, m, parse_size(a.budget), a.budget, device=a.device, group=g))
    work = Path(a.work) / "sweep"
    log_dir = Path(a.work) / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    mkpy, mkver = None, None
    head = env_block(f"sweep: model size vs time and memory at max_memory {a.budget}", None, models[next(iter(models))], py, mkpy, mkver)
    fp = code_fingerprint()
    run_rounds(jobs, a.runs, work, log_dir, py, {"": next(iter(models.values())), **models}, a.timeout,
               verify=not a.no_verify, retries=a.retries)  # fmt: skip
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = {j.name: summarize(j) for j in jobs}
    idle = sums[jobs[0].name]
    rows = []
    budget = parse_size(a.budget)
    for g, m in models.items():
        mm = metas[g]
        c = next((summarize(j) for j in jobs if j.kind == "copy" and j.group == g), None)
        s = next(summarize(j) for j in jobs if j.kind == "shardmerge" and j.group == g)
        if not s.get("n"):
            rows.append([f"{mm['total_bytes'] / GB:.2f}", mm["layers"], fmt_s(c.get("wall") if c else None), "–", "–", "–", "–", "–",
                         f"FAILED: {s.get('failed')}"])  # fmt: skip
            continue
        minus = s["wall"] - idle["wall"] if idle.get("wall") is not None else None
        above = s["rss"] - idle["rss"] if idle.get("rss") is not None else None
        notes = [verify_note(s)] if s.get("verified") else []
        if s.get("stages"):
            notes.append("stages " + ", ".join(f"{k} {fmt_s(v)}" for k, v in s["stages"].items()))
        if above is not None and above > budget:
            notes.append("**OVER BUDGET**")
        rows.append([f"{mm['total_bytes'] / GB:.2f}", mm["layers"], fmt_s(c.get("wall") if c else None), fmt_s(s["wall"]),
                     fmt_s(minus), (f"{minus / (mm['total_bytes'] / GB):.2f}" if minus is not None else "–"),
                     (f"{minus / c['wall']:.2f}" if (c and c.get("wall") and minus is not None) else "–"),
                     fmt_mb(above), "; ".join(n for n in notes if n)])  # fmt: skip
    table = md_table(["model GB", "layers", "copy floor s", "shardmerge wall s", "wall − start-up s", "s per GB",
                      "× copy floor", "RSS above idle MiB", "notes"], rows)  # fmt: skip
    body = (head + f"\nshape {a.shape} for every size (only the layer count changes); budget {a.budget} "
            f"({budget / MiB:.0f} MiB); idle start-up {fmt_s(idle.get('wall'))} s, {fmt_mb(idle.get('rss'))} MiB; runs {a.runs}\n\n" + table + "\n")  # fmt: skip
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"sweep:{a.shape}:{a.budget}", body)
    return 0


def cmd_ranks(a) -> int:
    py = a.python
    model, meta = ensure_model(Path(a.model) if a.model else None, a.size_gb, a.seed)
    jobs = [job_copy(model), job_idle(py)] + [job_ranks(py, model, int(n), a.budget) for n in csv_list(a.ranks)]
    work = Path(a.work) / "ranks"
    log_dir = Path(a.work) / "logs" / f"ranks-{time.strftime('%Y%m%d-%H%M%S')}"
    head = env_block(f"ranks: torchrun scale-out on {model.name}", meta, model, py, None, None)
    fp = code_fingerprint()
    run_rounds(jobs, a.runs, work, log_dir, py, {"": model}, a.timeout, verify=not a.no_verify, retries=a.retries)
    head += f"- {code_note(fp)}\n"
    rmtree(work)
    sums = [summarize(j) for j in jobs]
    copy, idle = sums[0], sums[1]
    rows = []
    for s in sums:
        if not s.get("n"):
            rows.append([s["name"], "–", "–", "–", "–", "–", "–", f"FAILED: {s.get('failed')}"])
            continue
        gbps = (s["out_bytes"] / GB / s["wall"]) if s.get("out_bytes") else None
        minus = s["wall"] - idle["wall"] if (s["kind"] == "ranks" and idle.get("wall")) else None
        gbps_minus = (s["out_bytes"] / GB / minus) if (s.get("out_bytes") and minus and minus > 0) else None
        ratio = s["wall"] / copy["wall"] if (copy.get("wall") and s["kind"] != "idle") else None
        notes = []
        if s["kind"] == "idle":
            notes.append("per process; torchrun starts N of these plus its launcher")
        if s.get("tree_rss"):
            notes.append(f"summed RSS of the tree (launcher + ranks) {fmt_mb(s['tree_rss'])} MiB (psutil, 20 ms)")
        reps = [r.get("report") for r in next(j for j in jobs if j.name == s["name"]).results if isinstance(r.get("report"), dict)]
        if reps and "ranks" in reps[0]:
            notes.append(f"report: ranks={reps[0]['ranks']}")
        if s.get("stages"):
            notes.append("stages " + ", ".join(f"{k} {fmt_s(v)}" for k, v in s["stages"].items()))
        vn = verify_note(s)
        if vn:
            notes.append(vn)
        if s.get("failed"):
            notes.append(f"later run FAILED: {s['failed']}")
        rows.append([s["name"], fmt_s(s["wall"]), (f"{gbps:.2f}" if gbps else "–"),
                     (f"{gbps_minus:.2f}" if gbps_minus else "–"), (f"{ratio:.2f}" if ratio else "–"),
                     fmt_mb(s.get("rss")), fmt_s(s.get("cpu")), "; ".join(notes)])  # fmt: skip
    table = md_table(["run", "median wall s", "output GB/s", "GB/s excl. one start-up", "× copy floor",
                      "peak RSS MiB (largest process)", "CPU s", "notes"], rows)  # fmt: skip
    body = head + f"\nbudget {a.budget} (per rank, as passed with --max-memory); runs {a.runs}\n\n" + table + "\n"
    print("\n" + body)
    if not a.no_results:
        write_results(Path(a.results), f"ranks:{model.name}", body)
    return 0


def cmd_gpu(a) -> int:
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


def cmd_smoke(a) -> int:
    root = Path(a.root)
    a.model = str(root / f"smoke-{a.size_gb:g}g")
    if a.results == str(DEFAULT_RESULTS):
        a.results = str(root / "SMOKE-RESULTS.md")
    rc = do_compare(a, title="smoke", key_prefix="smoke")
    if not a.keep_model:
        rmtree(Path(a.model))
    return rc


def cmd_install_mergekit(a) -> int:
    venv = Path(a.venv)
    torch_ver = a.torch
    if not torch_ver:
        r = subprocess.run([a.python, "-c", "import torch; print(torch.__version__.split('+')[0])"], capture_output=True, text=True)
        torch_ver = r.stdout.strip() or "2.13.0"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    if subprocess.run([*pip, f"torch=={torch_ver}"]).returncode != 0:
        print(f"bench: could not install torch=={torch_ver} into {venv}", file=sys.stderr)
        return 1
    for spec in ["mergekit", "mergekit==0.1.4", "mergekit==0.1.3", "mergekit==0.1.2", "mergekit==0.1.0", "mergekit==0.0.6"]:
        log(f"trying {spec} (torch pinned to {torch_ver})")
        if subprocess.run([*pip, spec, f"torch=={torch_ver}"]).returncode == 0:
            mkpy, ver = find_mergekit(str(py))
            if mkpy:
                log(f"mergekit {ver} installed in {venv}")
                return 0
    print("bench: mergekit could not be installed with this torch; compare will report 'mergekit: not installed'", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp, budgets=None, runs=3):
        sp.add_argument("--python", default=default_python(), help="python that runs shardmerge/PEFT (default: the project .venv)")
        sp.add_argument("--root", default=str(DEFAULT_ROOT), help="where generated models go (default %(default)s)")
        sp.add_argument("--work", default=str(DEFAULT_ROOT / "work"), help="scratch for outputs and logs (default %(default)s)")
        sp.add_argument("--results", default=str(DEFAULT_RESULTS), help="results markdown file (default %(default)s)")
        sp.add_argument("--no-results", action="store_true", help="print the table only")
        sp.add_argument("--runs", type=int, default=runs, help="measurements per tool; the median is reported")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--timeout", type=float, default=3600, help="seconds per measured run")
        sp.add_argument("--no-verify", action="store_true", help="skip the correctness check of the first output of each tool")
        sp.add_argument("--verify-full", action="store_true", help="verify every tensor (default: embeddings, head, first and last layer)")
        sp.add_argument("--strict", action="store_true", help="exit 1 when a tool fails or an output does not verify")
        sp.add_argument("--retries", type=int, default=1, help="re-run a failed measurement this many times before giving up on the tool")
        if budgets is not None:
            sp.add_argument("--budgets", default=budgets, help="comma-separated --max-memory values (default %(default)s)")

    g = sub.add_parser("generate", help="write a synthetic model + adapter + plan.yaml")
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
    g.add_argument("--force", action="store_true", help="regenerate even if an identical model exists")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compare", help="copy floor vs idle start-up vs shardmerge budgets vs PEFT vs mergekit")
    c.add_argument("--model", help="generated model dir")
    c.add_argument("--size-gb", type=float, help="generate (or reuse) a model of this size when --model has none")
    c.add_argument("--tools", default="copy,idle,shardmerge,peft,mergekit")
    c.add_argument("--mergekit-python", help="python of a venv with mergekit (default: $MERGEKIT_PYTHON or /tmp/mkvenv)")
    common(c, budgets="128MiB,256MiB,2GiB")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("sweep", help="model size vs wall time vs peak RSS at one budget")
    s.add_argument("--sizes", default="0.5,1,2,4")
    s.add_argument("--budget", default="256MiB")
    s.add_argument("--shape", default="h2048", choices=list(SHAPES), help="one shape for every size (default %(default)s)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-copy", action="store_true", help="skip the per-size copy floor")
    common(s, runs=1)
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("ranks", help="torchrun --nproc_per_node N for several N")
    r.add_argument("--model")
    r.add_argument("--size-gb", type=float)
    r.add_argument("--ranks", default="1,2,4")
    r.add_argument("--budget", default="1GiB")
    common(r, runs=1)
    r.set_defaults(func=cmd_ranks)

    gp = sub.add_parser("gpu", help="CUDA machine: generate a big model, copy floor vs shardmerge --device cuda")
    gp.add_argument("--size-gb", type=float, default=16)
    gp.add_argument("--model")
    gp.add_argument("--tools", default="copy,idle,shardmerge")
    gp.add_argument("--mergekit-python")
    common(gp, budgets="512MiB,2GiB,8GiB", runs=3)
    gp.set_defaults(func=cmd_gpu)

    sm = sub.add_parser("smoke", help="tiny end-to-end run for CI (generate + compare, runs=1)")
    sm.add_argument("--size-gb", type=float, default=0.05)
    sm.add_argument("--tools", default="copy,idle,shardmerge,peft,mergekit")
    sm.add_argument("--mergekit-python")
    sm.add_argument("--keep-model", action="store_true")
    sm.add_argument("--keep-going", action="store_true", help="exit 0 even when a tool fails (default: fail like --strict)")
    common(sm, budgets="64MiB,256MiB", runs=1)
    sm.set_defaults(func=cmd_smoke)

    im = sub.add_parser("install-mergekit", help="create a separate venv with mergekit and the project's torch version")
    im.add_argument("--venv", default=str(DEFAULT_MK_VENV))
    im.add_argument("--torch", help="torch version to pin (default: the project venv's)")
    im.add_argument("--python", default=default_python())
    im.set_defaults(func=cmd_install_mergekit)

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

    a = p.parse_args(argv)
    if a.mode == "smoke":
        a.strict = not a.keep_going
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
