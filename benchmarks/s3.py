"""Object-storage mode: shardmerge streaming s3:// -> s3:// against a plain download-merge-upload of the
same model, both against one local S3 API server (moto, its own process on 127.0.0.1).

    python benchmarks/s3.py [--size-gb 0.5] [--runs 3] [--write-results]

The plain route is what a user does today: download base and adapter with boto3's transfer manager
(concurrent ranged GETs), merge local -> local with shardmerge, upload the output (concurrent multipart).
Both routes produce the same bytes (checked: every output object's SHA-256). moto is a Python server, so
absolute rates are moto's; the comparison is what the benchmark is for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smbench.common import median  # noqa: E402
from smbench.synthetic import generate_model  # noqa: E402  (the synthetic model, shared with the other modes)

BUCKET = "bench"
ROOT = Path(os.environ.get("SHARDMERGE_BENCH_ROOT", "/tmp/shardmerge-bench"))
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARK = "## s3: streaming merge against download-merge-upload"


def start_server() -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, env
        except OSError:
            time.sleep(0.2)
    raise SystemExit("bench s3: moto server did not start (pip install 'moto[server]')")


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bench s3: {' '.join(command)} failed: {proc.stderr.read().decode()[-500:]}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def upload_dir(client, directory: Path, prefix: str) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")


def download_prefix(client, prefix: str, directory: Path) -> None:
    directory.mkdir(parents=True)
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]:
        client.download_file(BUCKET, obj["Key"], str(directory / obj["Key"][len(prefix) + 1 :]))


def clear_prefix(client, prefix: str) -> None:
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])


def digests(client, prefix: str) -> dict[str, str]:
    out = {}
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]:
        name = obj["Key"][len(prefix) + 1 :]
        if name != "shardmerge-manifest.json":  # it names the paths it was made from
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"]
            h = hashlib.sha256()
            while chunk := body.read(8 << 20):
                h.update(chunk)
            out[name] = h.hexdigest()
    return out


def plan(path: Path, base: str, adapter: str, output: str) -> Path:
    path.write_text(
        json.dumps({"base": base, "adapters": [adapter], "output": output, "device": "cpu", "max_memory": "1GiB"})
    )
    return path


def streaming(client, work: Path) -> tuple[float, int]:
    clear_prefix(client, "streamed")
    p = plan(work / "s3.yaml", f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", f"s3://{BUCKET}/streamed")
    return timed([sys.executable, "-m", "shardmerge", str(p), "-q"])


def download_merge_upload(client, work: Path) -> tuple[dict[str, float], int]:
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    clear_prefix(client, "plain")
    t0 = time.perf_counter()
    download_prefix(client, "base", stage / "base")
    download_prefix(client, "adapter", stage / "adapter")
    t1 = time.perf_counter()
    merged, rss = timed(
        [
            sys.executable,
            "-m",
            "shardmerge",
            str(plan(work / "local.yaml", str(stage / "base"), str(stage / "adapter"), str(stage / "merged"))),
            "-q",
        ]
    )
    t2 = time.perf_counter()
    upload_dir(client, stage / "merged", "plain")
    t3 = time.perf_counter()
    staged = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    shutil.rmtree(stage)
    return {"download": t1 - t0, "merge": merged, "upload": t3 - t2, "total": t3 - t0, "staged": staged}, rss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-results", action="store_true", help=f"replace the '{MARK}' section of RESULTS.md")
    a = parser.parse_args(argv)
    model = ROOT / f"model-{a.size_gb:g}g"
    meta = generate_model(model, a.size_gb)
    server, _ = start_server()
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        upload_dir(client, model / "base", "base")
        upload_dir(client, model / "adapter", "adapter")
        streamed = [streaming(client, model) for _ in range(a.runs)]
        plain = [download_merge_upload(client, model) for _ in range(a.runs)]
        same = digests(client, "streamed") == digests(client, "plain")
    finally:
        server.terminate()
        server.wait()
    table = report(meta, streamed, plain, same, a)
    print(table)
    if a.write_results:
        write_results(table)
    return 0 if same else 1


def report(meta: dict, streamed: list, plain: list, same: bool, a) -> str:
    size = meta["total_bytes"]
    s_time, s_rss = median([t for t, _ in streamed]), max(r for _, r in streamed)
    phases = {k: median([p[k] for p, _ in plain]) for k in ("download", "merge", "upload", "total")}
    p_rss, staged = max(r for _, r in plain), plain[0][0]["staged"]
    rows = [
        ("shardmerge s3:// -> s3:// (streaming)", s_time, s_rss, 0),
        ("download + merge + upload (total)", phases["total"], p_rss, staged),
        ("  download (boto3 transfer manager)", phases["download"], None, None),
        ("  merge local -> local (shardmerge)", phases["merge"], p_rss, None),
        ("  upload (boto3 transfer manager)", phases["upload"], None, None),
    ]
    setup = (
        f"`python benchmarks/s3.py --size-gb {a.size_gb:g} --runs {a.runs}`: a {size / 1e9:.2f} GB bf16 model "
        f"({meta['shards']} shards, {meta['layers']} layers, LoRA r={meta['rank']} on every projection), "
        "moto's S3 server in its own process on 127.0.0.1, `device: cpu`, `max_memory: 1GiB`; medians of "
        f"{a.runs}. Outputs identical (SHA-256 of every object): {'yes' if same else 'NO'}."
    )
    lines = [
        MARK,
        "",
        setup,
        "",
        "| route | wall s | MB/s | peak RSS of the merge | local disk staged |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds, rss, disk in rows:
        rss_text = "" if rss is None else f"{rss / 2**20:.0f} MiB"
        disk_text = "" if disk is None else f"{disk / 1e9:.2f} GB"
        lines.append(f"| {name} | {seconds:.1f} | {size / 1e6 / seconds:.1f} | {rss_text} | {disk_text} |")
    verdict = (
        f"Streaming runs at {phases['total'] / s_time:.2f}x the plain route's throughput here and stages nothing "
        "on local disk. moto is one Python process on the same (shared, loaded) cores as the client, so every "
        "request is expensive: the streaming route makes more, smaller requests (windows, parts, server-side "
        "copies) and pays for it; this does not measure real S3."
    )
    lines += ["", verdict]
    return "\n".join(lines) + "\n"


def write_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if MARK in text:
        start = text.index(MARK)
        following = text.find("\n## ", start + len(MARK))
        text = text[:start] + table + (text[following + 1 :] if following >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + table
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
