"""Inputs and outputs in S3, against a real S3 API server (moto's, started here on 127.0.0.1 at a free port).

The model is large enough for real multipart uploads (several 5 MiB+ parts per shard, untouched tensors big
enough to be server-side copies), and every result is compared byte for byte with a local merge of the same
inputs, which the other suites check against PEFT.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers.adapters import write_adapter
from helpers.models import write_model
from helpers.plans import fork_cli, killed_run, run_cli, write_plan
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

moto_server = pytest.importorskip("moto.server")
moto_s3 = pytest.importorskip("moto.s3.models")
boto3 = pytest.importorskip("boto3")

import shardmerge
import shardmerge.journal as journal_mod
from shardmerge.stores import s3 as s3_store
from shardmerge.verify import verify

BUCKET = "models"
MANIFEST = "shardmerge-manifest.json"
HIDDEN, VOCAB, INTER = 768, 8192, 2048
TARGETS = ("self_attn.q_proj", "mlp.up_proj")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connections:
    """The moto server's client connections, open or being accepted. A SIGKILLed client's requests are still
    served after it died (a CompleteMultipartUpload it sent lands later, and its upload leaves the open ones
    only then), so a test waits for them before it looks at what the killed run left."""

    def __init__(self, server):  # moto's werkzeug server, which socketserver's accept loop drives
        self.server, self.lock, self.accepting, self.open = server, threading.Lock(), 0, set()
        accept, close = server.get_request, server.shutdown_request

        def get_request():
            with self.lock:
                self.accepting += 1  # before accept(): a connection is always either still queued or counted
            try:
                request, address = accept()
                with self.lock:
                    self.open.add(request)
                return request, address
            finally:
                with self.lock:
                    self.accepting -= 1

        def shutdown_request(request):  # called once the connection's last request has been answered
            with self.lock:
                self.open.discard(request)
            close(request)

        server.get_request, server.shutdown_request = get_request, shutdown_request

    def known(self) -> set:
        with self.lock:
            return set(self.open)

    def settle(self, known: set, timeout: float = 60) -> None:
        """Wait until every connection opened since `known` was taken has been served and closed: call it once
        the client that opened them is dead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = select.select([self.server.socket], [], [], 0)[0]  # first: a queued one is counted next
            with self.lock:
                if not queued and not self.accepting and self.open <= known:
                    return
            time.sleep(0.01)
        raise AssertionError(f"the S3 server still serves a killed client's requests after {timeout} s")


@pytest.fixture(scope="module")
def moto():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def connections(moto):
    return Connections(moto._server)


@pytest.fixture(scope="module")
def server(moto):
    env = {
        "AWS_ENDPOINT_URL": "http://{}:{}".format(*moto.get_host_and_port()),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        s3_store._forget_store()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
        s3_store._forget_store()


@pytest.fixture(scope="module")
def client(server):
    return boto3.client("s3")


def s3_model(directory: Path) -> Path:
    """A bf16 Llama-shaped base in two ~19 MiB shards: 12 MiB embeddings and lm_head (untouched, with the
    norm and down_proj after them: server-side copies), merged projections, small norms between them."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": randn(VOCAB, HIDDEN)}, {"lm_head.weight": randn(VOCAB, HIDDEN)}]
    for i, shard in enumerate(shards):
        shard[f"model.layers.{i}.self_attn.q_proj.weight"] = randn(HIDDEN, HIDDEN)
        shard[f"model.layers.{i}.mlp.up_proj.weight"] = randn(INTER, HIDDEN)
        shard[f"model.layers.{i}.mlp.down_proj.weight"] = randn(HIDDEN, INTER)
        shard[f"model.layers.{i}.input_layernorm.weight"] = 1 + randn(HIDDEN)
    shards[1]["model.norm.weight"] = 1 + randn(HIDDEN)
    tensors = {name: t for shard in shards for name, t in shard.items()}
    config = {"model_type": "llama", "tie_word_embeddings": False}
    files = {"tokenizer_config.json": {"model_max_length": 128}}
    return write_model(directory, tensors, [list(shard) for shard in shards], config, files)


def s3_adapter(directory: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(2):
        for target, out in ((TARGETS[0], HIDDEN), (TARGETS[1], INTER)):
            key = f"base_model.model.model.layers.{i}.{target}"
            lora[f"{key}.lora_A.weight"] = torch.randn(8, HIDDEN, generator=g) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(out, 8, generator=g) * 0.1
    return write_adapter(directory, lora, r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"])


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def objects(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1 :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def etags(client, prefix: str) -> dict[str, str]:
    return {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]}


def open_uploads(client) -> list:
    return client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def assert_same_as_local(got: dict[str, bytes], reference: dict[str, bytes]) -> None:
    """Every shard, the index and the copied files byte for byte; the manifest names other paths."""
    assert sorted(got) == sorted(reference)
    differ = [name for name in reference if name != MANIFEST and got[name] != reference[name]]
    assert not differ, f"differ from the local merge: {differ}"


@pytest.fixture(scope="module")
def inputs(server, client, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    base, adapter = s3_model(root / "base"), s3_adapter(root / "adapter")
    for directory, prefix in ((base, "base"), (adapter, "adapter")):
        for path in directory.iterdir():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    shardmerge.merge({"base": str(base), "adapters": [str(adapter)], "output": str(root / "local"), "device": "cpu"})
    return {
        "root": root,
        "base": base,
        "adapter": adapter,
        "reference": files(root / "local"),
        "etags": {**etags(client, "base"), **etags(client, "adapter")},
    }


@pytest.fixture
def calls(monkeypatch):
    """Every S3 operation this process makes, as (operation, kwargs)."""
    made, real = [], s3_store.S3Store.call

    def call(self, operation, path, **kwargs):
        made.append((operation, kwargs))
        return real(self, operation, path, **kwargs)

    monkeypatch.setattr(s3_store.S3Store, "call", call)
    return made


def merge(base: str, adapter: str, output: str) -> shardmerge.MergeReport:
    return shardmerge.merge({"base": base, "adapters": [adapter], "output": output, "device": "cpu"})


def test_s3_to_s3_is_byte_identical_to_a_local_merge_with_untouched_tensors_copied_server_side(inputs, client, calls):
    merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", f"s3://{BUCKET}/s3-to-s3")
    assert_same_as_local(objects(client, "s3-to-s3"), inputs["reference"])
    copied = sum(_range_length(kw["CopySourceRange"]) for op, kw in calls if op == "upload_part_copy")
    assert copied >= 2 * (VOCAB * HIDDEN * 2 - s3_store.MIN_PART)  # both embeddings, less what the first parts borrow
    parts: dict[str, dict[int, int]] = {}
    for op, kw in calls:
        if op in ("upload_part", "upload_part_copy"):
            size = len(kw["Body"]) if op == "upload_part" else _range_length(kw["CopySourceRange"])
            parts.setdefault(kw["Key"], {})[kw["PartNumber"]] = size
    assert len(parts) == 2 and all(len(p) == 3 for p in parts.values())  # assembled, copied, assembled
    assert all(size >= s3_store.MIN_PART for p in parts.values() for n, size in p.items() if n < max(p))
    assert not open_uploads(client)
    assert {**etags(client, "base"), **etags(client, "adapter")} == inputs["etags"]


def _range_length(spec: str) -> int:
    first, last = spec.removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1


def test_s3_inputs_to_a_local_output_are_byte_identical_to_a_local_merge(inputs, tmp_path, client):
    merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", str(tmp_path / "out"))
    assert_same_as_local(files(tmp_path / "out"), inputs["reference"])
    assert verify(str(tmp_path / "out")) == []
    assert {**etags(client, "base"), **etags(client, "adapter")} == inputs["etags"]


def test_local_inputs_to_an_s3_output_are_byte_identical_to_a_local_merge(inputs, client):
    merge(str(inputs["base"]), str(inputs["adapter"]), f"s3://{BUCKET}/local-to-s3")
    assert_same_as_local(objects(client, "local-to-s3"), inputs["reference"])
    assert not open_uploads(client)


@pytest.mark.slow
def test_two_ranks_writing_an_s3_output_give_the_bytes_of_a_local_merge(inputs, client, tmp_path):
    """Each rank uploads its own shards (torchrun's variables, the launcher's rendezvous), rank 0 the rest."""
    plan = _plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/two-ranks")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(_free_port()), SHARDMERGE_DIST_TIMEOUT="20")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "shardmerge", plan, "-q"],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    assert_same_as_local(objects(client, "two-ranks"), inputs["reference"])
    assert not open_uploads(client)
    assert verify(f"s3://{BUCKET}/two-ranks") == []


def test_verify_checks_an_s3_output_and_names_a_modified_shard(inputs, client):
    output = f"s3://{BUCKET}/verified"
    merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", output)
    assert verify(output) == []
    shard = "verified/model-00002-of-00002.safetensors"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=shard)["Body"].read())
    data[-1] ^= 1
    client.put_object(Bucket=BUCKET, Key=shard, Body=bytes(data))
    problems = verify(output)
    assert problems == [f"s3://{BUCKET}/{shard}: checksum differs from the manifest (corrupted or modified)"]


def test_rerun_over_a_finished_s3_output_does_nothing(inputs, client, calls):
    output = f"s3://{BUCKET}/rerun"
    merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", output)
    calls.clear()
    report = merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", output)
    assert report.already_complete
    assert not [op for op, _ in calls if op in ("upload_part", "upload_part_copy", "put_object")]


def _killed_while_uploading(plan: str, at: int, connections: Connections) -> int:
    """A forked CLI run of `plan` that SIGKILLs itself once the `at`-th part upload it started is done; returns
    once the server has served every request the run sent."""
    known = connections.known()
    status = killed_run(plan, s3_store.S3Upload, "_upload", at, after=True)
    connections.settle(known)
    return status


def _open_parts(client) -> set[tuple[str, int]]:
    """(key, part number) of every part that S3 holds for an upload still open."""
    return {
        (u["Key"], p["PartNumber"])
        for u in open_uploads(client)
        for p in client.list_parts(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])
    }


def _uploaded(calls) -> set[tuple[str, int]]:
    return {(kw["Key"], kw["PartNumber"]) for op, kw in calls if op in ("upload_part", "upload_part_copy")}


def test_sigkill_while_uploading_then_resume_is_identical_reuploads_no_finished_part_and_leaves_no_upload(
    inputs, client, calls, connections, tmp_path
):
    output = "killed"
    plan = _plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/{output}")
    status = _killed_while_uploading(plan, at=2, connections=connections)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert MANIFEST not in objects(client, output)
    finished = _open_parts(client)
    assert finished, "the kill came before any part was uploaded"
    calls.clear()
    assert run_cli(plan, "-q").returncode == 0
    again = _uploaded(calls)
    assert not finished & again, f"finished parts uploaded again: {sorted(finished & again)}"
    assert_same_as_local(objects(client, output), inputs["reference"])
    assert not open_uploads(client)
    assert {**etags(client, "base"), **etags(client, "adapter")} == inputs["etags"]


def test_sigkill_while_completing_a_shard_then_resume_adopts_that_shard_and_reuploads_no_part_of_an_open_upload(
    inputs, client, calls, connections, tmp_path, monkeypatch
):
    """The run dies while the server completes its first shard's upload, which lands a second later (as on a
    loaded machine), after the resume's ListParts would otherwise have come. That shard was never journaled, but
    the object carries this plan's tag: the resume adopts it, uploading nothing of it again; parts of the uploads
    still open are not uploaded again either."""
    output = "completing"
    plan = _plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/{output}")
    child, forked, landed, resuming = [], threading.Event(), threading.Event(), threading.Event()
    complete, list_parts = moto_s3.S3Backend.complete_multipart_upload, moto_s3.S3Backend.list_parts

    def late_complete(backend, *args, **kwargs):
        if landed.is_set():
            return complete(backend, *args, **kwargs)
        forked.wait()
        os.kill(child[0], signal.SIGKILL)  # the request has arrived whole; its client is gone
        time.sleep(1)
        try:
            return complete(backend, *args, **kwargs)
        finally:
            landed.set()

    def list_parts_once_landed(backend, *args, **kwargs):
        if resuming.is_set():
            landed.wait(30)
        return list_parts(backend, *args, **kwargs)

    monkeypatch.setattr(moto_s3.S3Backend, "complete_multipart_upload", late_complete)
    monkeypatch.setattr(moto_s3.S3Backend, "list_parts", list_parts_once_landed)
    known = connections.known()
    child.append(fork_cli(plan, "-q"))
    forked.set()
    status = os.waitpid(child[0], 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    connections.settle(known)
    completed = [name for name in objects(client, output) if name.endswith(".safetensors")]
    assert completed, "no complete landed"
    finished = _open_parts(client)
    calls.clear()
    resuming.set()
    assert run_cli(plan, "-q").returncode == 0
    again = _uploaded(calls)
    assert not finished & again, f"finished parts uploaded again: {sorted(finished & again)}"
    assert not _written(calls, f"{output}/{completed[0]}"), "the completed shard was uploaded again"
    assert_same_as_local(objects(client, output), inputs["reference"])
    assert not open_uploads(client)


def _written(calls, key: str) -> list[str]:
    """The operations that (re)write the object `key`."""
    writes = ("create_multipart_upload", "upload_part", "upload_part_copy", "put_object", "copy_object")
    return [op for op, kw in calls if op in writes and kw.get("Key") == key]


@pytest.mark.parametrize("replaced", [False, True], ids=["ours", "replaced-by-another-writer"])
def test_shard_completed_but_not_journaled_is_adopted_only_while_it_is_the_object_this_plan_uploaded(
    inputs, client, calls, connections, tmp_path, replaced
):
    output = f"unjournaled-{replaced}"
    plan = _plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/{output}")
    known = connections.known()
    status = killed_run(plan, journal_mod.OutputState, "journal", 1)  # after CompleteMultipartUpload
    connections.settle(known)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (completed,) = [name for name in objects(client, output) if name.endswith(".safetensors")]
    key = f"{output}/{completed}"
    if replaced:  # the same bytes, put by someone else: nothing proves they are what this plan wrote
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    calls.clear()
    assert run_cli(plan, "-q").returncode == 0
    assert bool(_written(calls, key)) == replaced
    assert_same_as_local(objects(client, output), inputs["reference"])
    assert not open_uploads(client)


def test_input_changed_while_a_shard_was_half_uploaded_restarts_its_upload_from_the_new_input(
    inputs, client, connections, tmp_path
):
    """Parts a killed run uploaded were made from the inputs as they were then: after an input changes (the same
    header, other values), the resume uploads those shards afresh rather than mixing the two versions."""
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs["adapter"], adapter)
    for path in adapter.iterdir():
        client.upload_file(str(path), BUCKET, f"changing-adapter/{path.name}")
    output = "input-changed"
    plan = str(
        write_plan(
            tmp_path / "plan.yaml",
            base=f"s3://{BUCKET}/base",
            adapters=[f"s3://{BUCKET}/changing-adapter"],
            output=f"s3://{BUCKET}/{output}",
            device="cpu",
        )
    )
    _killed_while_uploading(plan, at=3, connections=connections)
    assert _open_parts(client), "the kill came before any part was uploaded"
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: -v if "lora_B" in k else v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    client.upload_file(str(weights), BUCKET, "changing-adapter/adapter_model.safetensors")
    assert run_cli(plan, "-q").returncode == 0
    merge(str(inputs["base"]), str(adapter), str(tmp_path / "local"))
    assert_same_as_local(objects(client, output), files(tmp_path / "local"))
    assert not open_uploads(client)


def test_overwriting_an_s3_output_of_another_plan_aborts_its_abandoned_uploads(inputs, client, connections, tmp_path):
    output = "replaced"
    plan = _plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/{output}", dtype="float16")
    _killed_while_uploading(plan, at=2, connections=connections)
    assert open_uploads(client)
    shardmerge.merge(
        {
            "base": f"s3://{BUCKET}/base",
            "adapters": [f"s3://{BUCKET}/adapter"],
            "output": f"s3://{BUCKET}/{output}",
            "device": "cpu",
            "overwrite": True,
        }
    )
    assert_same_as_local(objects(client, output), inputs["reference"])
    assert not open_uploads(client)


def one_error_line(argv: list[str]) -> str:
    result = run_cli(*argv)
    err = result.stderr.strip()
    assert result.returncode != 0 and err and "\n" not in err and "Traceback" not in err, err
    return err


def _plan(tmp_path: Path, base: str, output: str, **options) -> str:
    """plan.yaml merging the uploaded adapter into `base`."""
    adapters = [f"s3://{BUCKET}/adapter"]
    return str(write_plan(tmp_path / "plan.yaml", base=base, adapters=adapters, output=output, device="cpu", **options))


def test_missing_bucket_is_one_line_naming_it(inputs, tmp_path):
    err = one_error_line([_plan(tmp_path, "s3://no-such-bucket/base", str(tmp_path / "out")), "-q"])
    assert "s3://no-such-bucket" in err and "no such bucket" in err
    err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", "s3://no-such-bucket/out"), "-q"])
    assert "s3://no-such-bucket" in err and "no such bucket" in err


def test_missing_base_prefix_is_one_line_naming_it(inputs, tmp_path):
    err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/nothing-here", str(tmp_path / "out")), "-q"])
    assert f"s3://{BUCKET}/nothing-here" in err and "not found" in err


@pytest.mark.parametrize("variable", ["AWS_PROFILE", "AWS_CONFIG_FILE"])
def test_a_missing_profile_or_unreadable_aws_config_is_one_line_naming_it(inputs, tmp_path, monkeypatch, variable):
    broken = tmp_path / "aws-config"
    broken.write_text("[default\nregion = us-east-1\n")  # no closing bracket: not an INI file
    value = "no-such-profile" if variable == "AWS_PROFILE" else str(broken)
    monkeypatch.setenv(variable, value)
    s3_store._forget_store()
    try:
        err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", str(tmp_path / "out")), "-q"])
    finally:
        s3_store._forget_store()
    assert value in err and variable in err and "internal error" not in err, err
    assert not (tmp_path / "out" / "shardmerge-manifest.json").exists()


def test_unreachable_endpoint_is_one_line_naming_it(inputs, tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3_store._forget_store()
    try:
        err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", str(tmp_path / "out")), "-q"])
    finally:
        s3_store._forget_store()
    assert endpoint in err and f"s3://{BUCKET}" in err and "cannot reach" in err


@pytest.fixture
def authenticated(server, monkeypatch):
    """moto enforces IAM from here on: a user whose policy allows listing the bucket and nothing else."""
    import urllib.request

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{server['AWS_ENDPOINT_URL']}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request).read()

    reset_auth("3")  # the three IAM calls below go through unauthenticated
    try:
        iam, user = boto3.client("iam"), f"lister-{os.urandom(4).hex()}"
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user,
            PolicyName="list",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}"}],
                }
            ),
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        s3_store._forget_store()
        yield key
    finally:
        s3_store._forget_store()
        reset_auth("inf")


def test_denied_access_is_one_line_naming_the_key(inputs, authenticated, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", authenticated["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", authenticated["SecretAccessKey"])
    err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", str(tmp_path / "out")), "-q"])
    assert f"s3://{BUCKET}/base/" in err and "access denied" in err


def test_wrong_credentials_are_one_line_naming_the_endpoint(inputs, authenticated, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", str(tmp_path / "out")), "-q"])
    assert f"s3://{BUCKET}/base" in err and "refused the credentials" in err


def test_transient_errors_are_retried_with_backoff_and_counted(inputs, client, tmp_path):
    """The endpoint answers 503 SlowDown to every third ranged GET; the merge still completes, identical,
    and the report counts the retries."""
    from botocore.awsrequest import AWSResponse

    store, seen = s3_store._shared_store(), [0]

    def slow_down(request, **_):
        seen[0] += 1
        if seen[0] % 3 == 0:
            body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            return AWSResponse(request.url, 503, {}, _Raw(body))
        return None

    store.client.meta.events.register("before-send.s3.GetObject", slow_down)
    try:
        report = merge(f"s3://{BUCKET}/base", f"s3://{BUCKET}/adapter", str(tmp_path / "out"))
    finally:
        store.client.meta.events.unregister("before-send.s3.GetObject", slow_down)
    assert_same_as_local(files(tmp_path / "out"), inputs["reference"])
    assert report.store_retries >= seen[0] // 3 > 0
    assert f"{report.store_retries} transient storage errors retried" in report.summary()


class _Raw:
    """The raw body botocore reads an error response from."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def test_other_schemes_are_refused_naming_the_s3_compatible_route(tmp_path):
    err = one_error_line([_plan(tmp_path, "gs://bucket/base", str(tmp_path / "out")), "-q"])
    assert "gs://bucket/base" in err and "AWS_ENDPOINT_URL" in err


# -- the part layout, as a property: any file, any copyable ranges -------------------------------------------
MiB = 2**20


@st.composite
def layouts(draw):
    """A file size and sorted, disjoint copyable ranges in it (offset, length, source, source offset)."""
    size = draw(st.integers(1, 80 * MiB))
    cuts = sorted(draw(st.lists(st.integers(1, size), max_size=12, unique=True)))
    bounds = [0, *cuts, size]
    ranges = [(a, b - a, "src", 3 * a) for a, b in pairwise(bounds) if b > a and draw(st.booleans())]
    return size, ranges


@given(layouts(), st.sampled_from([s3_store.MIN_PART, s3_store.PART, 13 * MiB]))
@settings(max_examples=150, deadline=None)
def test_parts_cover_the_file_in_order_and_all_but_the_last_meet_the_minimum(layout, part):
    size, copyable = layout
    parts = s3_store.plan_parts(size, copyable, part)
    assert [p.number for p in parts] == list(range(1, len(parts) + 1))
    assert parts[0].start == 0 and parts[-1].end == size
    assert all(a.end == b.start for a, b in pairwise(parts))
    assert all(p.size >= s3_store.MIN_PART for p in parts[:-1])
    assert all(p.size <= max(part, s3_store.MIN_PART) + s3_store.MIN_PART for p in parts if p.source is None)


@given(layouts())
@settings(max_examples=150, deadline=None)
def test_a_copied_part_lies_inside_one_copyable_range_and_reads_the_matching_source_bytes(layout):
    size, copyable = layout
    for p in s3_store.plan_parts(size, copyable):
        if p.source is None:
            continue
        ((offset, _, source, src_offset),) = [r for r in copyable if r[0] <= p.start and p.end <= r[0] + r[1]]
        assert p.source == (source, src_offset + p.start - offset)
        assert p.size <= s3_store.MAX_COPY_PART


def test_untouched_ranges_of_at_least_twice_the_minimum_are_copied_server_side():
    size = 40 * MiB
    parts = s3_store.plan_parts(size, [(1000, 20 * MiB, "src", 1000)])
    copied = sum(p.size for p in parts if p.source is not None)
    assert copied == 20 * MiB - (s3_store.MIN_PART - 1000)  # the header's part borrows what it lacks


def test_planning_reads_only_the_base_shards_headers(inputs, tmp_path, calls):
    """--dry-run from s3://: every GET of a base shard lies inside its header."""
    from shardmerge.safetensors_io import read_header

    header_ends = {f"base/{p.name}": read_header(p).data_start for p in inputs["base"].glob("*.safetensors")}
    plan = {
        "base": f"s3://{BUCKET}/base",
        "adapters": [f"s3://{BUCKET}/adapter"],
        "output": f"s3://{BUCKET}/dry",
        "device": "cpu",
    }
    assert run_cli(write_plan(tmp_path / "plan.yaml", **plan), "--dry-run").returncode == 0
    gets = [(kw["Key"], _range_end(kw["Range"])) for op, kw in calls if op == "get_object" and kw["Key"] in header_ends]
    assert {key for key, _ in gets} == set(header_ends)
    assert all(end < header_ends[key] for key, end in gets), gets


def _range_end(spec: str) -> int:
    return int(spec.removeprefix("bytes=").split("-")[1])


def test_an_s3_output_inside_an_s3_input_is_refused(inputs, tmp_path):
    err = one_error_line([_plan(tmp_path, f"s3://{BUCKET}/base", f"s3://{BUCKET}/base/merged"), "-q"])
    assert f"s3://{BUCKET}/base/merged" in err and "overlaps the input" in err


def test_an_s3_adapter_replacing_a_tensor_of_a_local_base_in_another_dtype_merges_as_from_a_local_adapter(
    inputs, client, tmp_path
):
    # A local base's merged tensors are read in place (mapped); the adapter's float32 lm_head, rounded to the
    # base's bf16, is read from S3, which cannot be mapped.
    lm_head = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2))
    adapter = write_adapter(
        tmp_path / "adapter", {"base_model.model.lm_head.weight": lm_head}, modules_to_save=["lm_head"]
    )
    for path in adapter.iterdir():
        client.upload_file(str(path), BUCKET, f"mts-adapter/{path.name}")
    merge(str(inputs["base"]), str(adapter), str(tmp_path / "local"))
    merge(str(inputs["base"]), f"s3://{BUCKET}/mts-adapter", str(tmp_path / "out"))
    assert_same_as_local(files(tmp_path / "out"), files(tmp_path / "local"))
