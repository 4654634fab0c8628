"""Objects in S3 or an S3-compatible store (MinIO, Ceph RGW, R2, GCS's XML API), through boto3.

boto3 because it exposes what a resumable, planned upload needs and obstore does not: the multipart
upload id, ListParts, UploadPartCopy with a source byte range, and aborting an upload by id. Endpoint,
credentials, region, profile and retry settings come from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION/AWS_DEFAULT_REGION,
AWS_MAX_ATTEMPTS, AWS_RETRY_MODE).

Reads are ranged GETs, split into several in flight, into the caller's buffer (so within max_memory).
Each output shard is one multipart upload whose parts are planned byte ranges (plan_parts): untouched
tensors already in the same store are copied server-side with UploadPartCopy, so no byte of them crosses
the node; everything else is assembled into part buffers and uploaded. The upload id is recorded at the
shard's staging key, so a killed run resumes the same upload and skips the parts S3 already holds.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

from ..errors import ShardmergeError
from .base import PendingFile, Reader, Stat, Store

MIN_PART = 5 * 2**20  # S3's minimum for every part but the last
PART = 8 * 2**20  # the size of an assembled part, unless a shard needs more to stay within MAX_PARTS
MAX_PARTS = 10_000
MAX_COPY_PART = 5 * 2**30  # UploadPartCopy's largest range
READ_CHUNK = 8 * 2**20  # one ranged GET; a larger read is split into several in flight
# The executor's reads (tiles, an adapter's A and B, norms) come in file order, most far smaller than a
# request's latency is worth. They are served from windows of WINDOW bytes, each fetched once, and the next
# AHEAD windows are fetched in the background while the current one is read: a stream of large GETs.
# Windows are kept for the FILES most recently read (the adapter's and the base shard's interleave).
WINDOW, AHEAD, FILES = 8 * 2**20, 3, 3
READERS = 8
UPLOADS = 8  # part uploads in flight per process; the writer waits for a free slot
_BODY_CHUNK = 2**20
_TAG_KEY = "shardmerge-tag"  # object metadata: what a published shard is (Store.adopt)
_BODY_ATTEMPTS = 4  # a response body cut off mid-read is fetched again (botocore retries only the request)


@dataclass(frozen=True)
class S3Path:
    """s3://bucket/key, with the part of pathlib's interface that the package uses."""

    bucket: str
    key: str = ""

    @property
    def store(self) -> S3Store:
        return _shared_store()

    def __truediv__(self, name: str) -> S3Path:
        return S3Path(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        dot = self.name.rfind(".")
        return self.name[dot:] if dot > 0 else ""

    @property
    def parent(self) -> S3Path:
        return S3Path(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def is_relative_to(self, other: S3Path) -> bool:
        return (
            isinstance(other, S3Path)
            and self.bucket == other.bucket
            and (not other.key or self.key == other.key or self.key.startswith(other.key + "/"))
        )


def parse_url(url: str) -> S3Path:
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ShardmergeError(f"{url}: an s3:// path needs a bucket (s3://bucket/prefix)")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ShardmergeError(f"{url}: '.' and '..' are not allowed in an s3:// path")
    return S3Path(bucket, "/".join(parts))


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of an output file: uploaded from a buffer, or copied server-side from `source`
    (an S3Path and the offset there) when `source` is set."""

    number: int
    start: int
    end: int
    source: tuple | None = None

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_parts(size: int, copyable: list[tuple[int, int, object, int]], part: int = PART) -> list[Part]:
    """The parts of a `size`-byte file. `copyable` are (offset, length, source path, source offset) ranges
    the store can copy server-side, sorted. Every part but the last is at least MIN_PART: a short gap
    before a copyable range borrows from the range, and a range left too short is assembled instead."""
    part = max(part, -(-size // (MAX_PARTS - 1000)))  # copy ranges split off extra parts; keep room for them
    spans: list[tuple[int, int, tuple | None]] = []
    cursor = 0
    for offset, length, src, src_offset in copyable:
        if 0 < offset - cursor < MIN_PART:
            take = MIN_PART - (offset - cursor)
            offset, length, src_offset = offset + take, length - take, src_offset + take
        gap = offset - cursor
        if length < MIN_PART:
            continue  # too short to stand as a part: its bytes are assembled with their neighbours
        spans += _split(cursor, offset, max(1, min(-(-gap // part), gap // MIN_PART)) if gap else 0, None)
        spans += _split(offset, offset + length, -(-length // MAX_COPY_PART), (src, src_offset))
        cursor = offset + length
    rest = size - cursor
    spans += _split(cursor, size, max(1, min(-(-rest // part), rest // MIN_PART)) if rest else 0, None)
    return [Part(i + 1, start, end, source) for i, (start, end, source) in enumerate(spans)]


def _split(start: int, end: int, count: int, source: tuple | None) -> list[tuple[int, int, tuple | None]]:
    """[start, end) as `count` pieces of equal size (to a byte)."""
    if count == 0:
        return []
    bounds = [start + (end - start) * i // count for i in range(count + 1)]
    spans = []
    for a, b in pairwise(bounds):
        offset = None if source is None else (source[0], source[1] + a - start)
        spans.append((a, b, offset))
    return spans


def _shared_store() -> S3Store:
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = S3Store()
        return _STORE


_STORE: S3Store | None = None
_STORE_LOCK = threading.Lock()


def _forget_store() -> None:
    """A forked child has the parent's client but not its pool threads: it starts its own store."""
    global _STORE, _STORE_LOCK
    _STORE, _STORE_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_store)


def retries() -> int:
    return 0 if _STORE is None else _STORE.retries


def _session(boto3):
    """boto3's session reads the AWS config and credentials files and the profile AWS_PROFILE names, all the
    user's to fix: a missing profile or a file that does not parse is one line naming it."""
    from botocore.exceptions import ConfigParseError, ProfileNotFound

    try:
        return boto3.session.Session()
    except ProfileNotFound as e:
        raise ShardmergeError(
            f"AWS profile {e.kwargs.get('profile')!r} (AWS_PROFILE) is in neither the AWS config file nor the "
            "credentials file (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE; default ~/.aws/config, "
            "~/.aws/credentials); add it there or unset AWS_PROFILE"
        ) from None
    except ConfigParseError as e:
        raise ShardmergeError(
            f"{e.kwargs.get('path')}: cannot parse this AWS config or credentials file (AWS_CONFIG_FILE, "
            "AWS_SHARED_CREDENTIALS_FILE): it must be INI sections such as [default] or [profile NAME]"
        ) from None


class S3Store(Store):
    resumes_partials = True

    def __init__(self):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ShardmergeError("s3:// paths need boto3: pip install 'shardmerge[s3]'") from None
        retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
        if "AWS_MAX_ATTEMPTS" not in os.environ:
            retries["max_attempts"] = 6
        config = Config(
            retries=retries, max_pool_connections=READERS + UPLOADS + 4, connect_timeout=10, read_timeout=120
        )
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.client = _session(boto3).client("s3", region_name=region, config=config)
        self.endpoint = self.client.meta.endpoint_url
        self.retries = 0
        self._count = threading.Lock()
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="s3-get")
        self.windows: dict = {}  # (path, ETag) -> {window start: future of its bytes}, most recent file last
        self.window_lock = threading.Lock()
        self.uploads = ThreadPoolExecutor(UPLOADS, thread_name_prefix="s3-put")
        self.copies = ThreadPoolExecutor(UPLOADS, thread_name_prefix="s3-copy")  # server-side: no buffer
        self.upload_slots = threading.BoundedSemaphore(UPLOADS)

    # -- one call, its retries counted, its failure one line -------------------------------------------------
    def call(self, operation: str, path: S3Path, **kwargs) -> dict:
        try:
            response = getattr(self.client, operation)(**kwargs)
        except Exception as e:  # noqa: BLE001 - botocore's exceptions share no base; _failure sorts them
            self._retried(getattr(e, "response", None))
            raise self._failure(e, path, operation) from None
        self._retried(response)
        return response

    def _retried(self, response) -> None:
        attempts = ((response or {}).get("ResponseMetadata") or {}).get("RetryAttempts", 0)
        if attempts:
            with self._count:
                self.retries += attempts

    def _failure(self, e: Exception, path: S3Path, operation: str) -> Exception:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return ShardmergeError(
                f"{path}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
            return ShardmergeError(
                f"{path}: cannot reach the S3 endpoint {self.endpoint} "
                f"({type(e).__name__}); check AWS_ENDPOINT_URL and the network"
            )
        if not isinstance(e, ClientError):
            return ShardmergeError(f"{path}: S3 {operation} failed: {type(e).__name__}: {_first_line(e)}")
        error = e.response.get("Error", {})
        code, status = str(error.get("Code", "")), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or operation == "head_bucket" and code in ("404", "NotFound"):
            return ShardmergeError(
                f"s3://{path.bucket}: no such bucket at {self.endpoint}; check the bucket name, "
                "AWS_ENDPOINT_URL and the region"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(str(path))
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
            "InvalidClientTokenId",
            "AuthorizationHeaderMalformed",
        ):
            return ShardmergeError(
                f"{path}: the S3 endpoint {self.endpoint} refused the credentials ({code}); "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile"
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return ShardmergeError(
                f"{path}: access denied ({operation}); the credentials lack permission for bucket {path.bucket}"
            )
        if code in ("PreconditionFailed", "412"):
            return ShardmergeError(f"{path}: the object changed during the merge; re-run once it is stable")
        return ShardmergeError(
            f"{path}: S3 {operation} failed: {code or status}: {_first_line(error.get('Message', ''))}"
        )

    def _missing(self, operation: str, path: S3Path, **kwargs) -> dict | None:
        """The response, or None when the key does not exist."""
        try:
            return self.call(operation, path, **kwargs)
        except FileNotFoundError:
            return None

    # -- reading ----------------------------------------------------------------------------------------------
    def open(self, path: S3Path, readahead: bool = False) -> Reader:
        return S3Reader(self, path, readahead)

    def stat(self, path: S3Path) -> Stat | None:
        if not path.key:
            return None
        head = self._missing("head_object", path, Bucket=path.bucket, Key=path.key)
        if head is None:
            return None
        return Stat(head["ContentLength"], head.get("VersionId") or head["ETag"])

    def is_dir(self, path: S3Path) -> bool:
        if not path.key:
            self.call("head_bucket", path, Bucket=path.bucket)
            return True
        found = self.call("list_objects_v2", path, Bucket=path.bucket, Prefix=path.key + "/", MaxKeys=1)
        return found.get("KeyCount", 0) > 0

    def list(self, directory: S3Path) -> list[S3Path]:
        prefix = directory.key + "/" if directory.key else ""
        found, token = set(), {}
        while True:
            page = self.call(
                "list_objects_v2", directory, Bucket=directory.bucket, Prefix=prefix, Delimiter="/", **token
            )
            found |= {c["Prefix"].rstrip("/") for c in page.get("CommonPrefixes", [])}
            found |= {o["Key"] for o in page.get("Contents", []) if o["Key"] != prefix}
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        return [S3Path(directory.bucket, key) for key in sorted(found)]

    def read_small(self, path: S3Path, limit: int) -> bytes:
        response = self.call("get_object", path, Bucket=path.bucket, Key=path.key, Range=f"bytes=0-{limit}")
        return response["Body"].read()

    def real(self, path: S3Path) -> S3Path:
        return path

    def contains(self, root, path: S3Path) -> bool:
        return path.is_relative_to(root)

    # -- writing ----------------------------------------------------------------------------------------------
    def create(self, path: S3Path, size: int, staging: S3Path, copies=(), tag: str = "") -> PendingFile:
        copyable = [(dst, n, src_path, src) for src_path, src, dst, n in copies if isinstance(src_path, S3Path)]
        return S3Upload(self, path, staging, plan_parts(size, copyable), tag)

    def adopt(self, path: S3Path, size: int, tag: str, scratch_size: int) -> dict | None:
        # Only CompleteMultipartUpload of an upload created with this tag makes an object carrying it (a
        # replaced object carries its own metadata), and objects do not change in place.
        head = self._missing("head_object", path, Bucket=path.bucket, Key=path.key)
        if head is None or head.get("Metadata", {}).get(_TAG_KEY) != tag or head["ContentLength"] != size:
            return None
        return {"etag": head["ETag"]}

    def put(self, path: S3Path, data: bytes | bytearray) -> None:
        self.call("put_object", path, Bucket=path.bucket, Key=path.key, Body=data)

    def append(self, path: S3Path, line: bytes) -> None:
        # Objects cannot grow: the journal is rewritten whole, which is cheap at one line per shard.
        current = self._missing("get_object", path, Bucket=path.bucket, Key=path.key)
        self.put(path, (current["Body"].read() if current else b"") + line)

    def copy_file(self, source_store: Store, source, path: S3Path, staging) -> int:
        if isinstance(source, S3Path):
            self.call(
                "copy_object",
                path,
                Bucket=path.bucket,
                Key=path.key,
                CopySource={"Bucket": source.bucket, "Key": source.key},
            )
            return self.stat(path).size
        size = source_store.stat(source).size
        data = bytearray(size)
        with source_store.open(source) as reader:
            reader.read_into(data, 0)
        self.put(path, data)
        return size

    def checksum(self, path: S3Path, scratch_size: int) -> dict:
        return {"etag": self.call("head_object", path, Bucket=path.bucket, Key=path.key)["ETag"]}

    def delete(self, path: S3Path) -> None:
        keys = [path.key] if path.key else []
        keys += [p.key for p in self._all_under(path)]
        for i in range(0, len(keys), 1000):
            self.call(
                "delete_objects",
                path,
                Bucket=path.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )

    def _all_under(self, directory: S3Path) -> list[S3Path]:
        prefix = directory.key + "/" if directory.key else ""
        found, token = [], {}
        while True:
            page = self.call("list_objects_v2", directory, Bucket=directory.bucket, Prefix=prefix, **token)
            found += [S3Path(directory.bucket, o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return found
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def make_dirs(self, directory: S3Path) -> None:
        self.call("head_bucket", directory, Bucket=directory.bucket)  # a missing bucket is named up front

    def remove_empty_dir(self, directory: S3Path) -> None:
        pass  # prefixes exist only while objects do

    def lock(self, path: S3Path):
        return _NoLock()  # S3 has no lock; see README "Object storage" (one run per output prefix)

    def abort_uploads(self, directory: S3Path) -> int:
        prefix = directory.key + "/" if directory.key else ""
        aborted, token = 0, {}
        while True:
            page = self.call("list_multipart_uploads", directory, Bucket=directory.bucket, Prefix=prefix, **token)
            for upload in page.get("Uploads", []):
                self._abort(S3Path(directory.bucket, upload["Key"]), upload["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            token = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _abort(self, path: S3Path, upload_id: str) -> None:
        try:
            self.call("abort_multipart_upload", path, Bucket=path.bucket, Key=path.key, UploadId=upload_id)
        except (FileNotFoundError, ShardmergeError):
            pass  # already completed or aborted (NoSuchUpload)

    def write_memory(self) -> int:
        return (UPLOADS + 4) * PART + FILES * (1 + AHEAD) * WINDOW  # per file: the window being read, the next


class _NoLock:
    def release(self) -> None:
        pass


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


class S3Reader(Reader):
    def __init__(self, store: S3Store, path: S3Path, readahead: bool):
        self.store, self.path, self.readahead = store, path, readahead
        head = store.call("head_object", path, Bucket=path.bucket, Key=path.key)
        self.etag, self.size = head["ETag"], head["ContentLength"]

    def read_into(self, buffer, offset: int) -> None:
        view = memoryview(buffer).cast("B")
        if offset + len(view) > self.size:
            raise ShardmergeError(
                f"{self.path}: object ended at byte {self.size} while reading; truncated or changed during the merge"
            )
        if self.readahead and len(view) <= WINDOW:
            self._windowed(view, offset)
            return
        ranges = [(o, min(READ_CHUNK, len(view) - o)) for o in range(0, len(view), READ_CHUNK)]
        if len(ranges) <= 1:
            self._get(view, offset)
            return
        futures = [self.store.readers.submit(self._get, view[o : o + n], offset + o) for o, n in ranges]
        for future in futures:
            future.result()

    def _windowed(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            start = (offset + done) // WINDOW * WINDOW
            data = self._window(start).result()
            n = min(len(view) - done, start + len(data) - offset - done)
            view[done : done + n] = data[offset + done - start : offset + done - start + n]
            done += n

    def _window(self, start: int):
        """The future bytes of the window at `start`, fetched if needed; the AHEAD next ones are fetched
        meanwhile. A file keeps only these windows, so its memory is bounded whatever the reads."""
        key = (self.path, self.etag)
        with self.store.window_lock:
            windows = self.store.windows.pop(key, {})
            wanted = [start + i * WINDOW for i in range(1 + AHEAD)]
            for begin in wanted:
                if begin < self.size and begin not in windows:
                    windows[begin] = self.store.readers.submit(self._fetch, begin)
            for begin in [b for b in windows if b not in wanted]:
                del windows[begin]
            self.store.windows[key] = windows  # most recent last
            while len(self.store.windows) > FILES:
                del self.store.windows[next(iter(self.store.windows))]
            return windows[start]

    def _fetch(self, start: int) -> bytearray:
        data = bytearray(min(WINDOW, self.size - start))
        self._get(memoryview(data), start)
        return data

    def _get(self, view: memoryview, offset: int) -> None:
        if not len(view):
            return
        for attempt in range(_BODY_ATTEMPTS):
            response = self.store.call(
                "get_object",
                self.path,
                Bucket=self.path.bucket,
                Key=self.path.key,
                Range=f"bytes={offset}-{offset + len(view) - 1}",
                IfMatch=self.etag,
            )
            try:
                _read_body(response["Body"], view, self.path)
                return
            except (OSError, ValueError) as e:  # the connection dropped mid-body
                if attempt == _BODY_ATTEMPTS - 1:
                    raise ShardmergeError(
                        f"{self.path}: reading failed after {_BODY_ATTEMPTS} attempts: {_first_line(e)}"
                    ) from None
                with self.store._count:
                    self.store.retries += 1
                time.sleep(random.uniform(0, 0.2 * 2**attempt))


def _read_body(body, view: memoryview, path: S3Path) -> None:
    done = 0
    while done < len(view):
        data = body.read(min(_BODY_CHUNK, len(view) - done))
        if not data:
            raise OSError(f"{path}: response ended at byte {done} of {len(view)}")
        view[done : done + len(data)] = data
        done += len(data)


class S3Upload(PendingFile):
    """One output file as a multipart upload of planned parts.

    An assembled part is uploaded as soon as all its bytes are in: written tiles are copied into its
    buffer as they come, and ranges copied from an input are only noted and fetched when the part is
    complete, so a part buffer lives from its first write to its upload. Server-side copies run in the
    background, so the copier notes every range of a shard before the writer's tiles reach it and the
    writer holds about one part buffer at a time. Parts that an earlier, killed run already uploaded
    (ListParts of the recorded upload) are skipped."""

    def __init__(self, store: S3Store, path: S3Path, staging: S3Path, parts: list[Part], tag: str = ""):
        self.store, self.path, self.staging, self.parts, self.tag = store, path, staging, parts, tag
        self._starts = [p.start for p in parts]
        self._lock = threading.Lock()
        self._filled = [0] * len(parts)
        self._buffers: dict[int, bytearray] = {}
        self._sources: dict[int, list] = {}
        self._futures: list = []
        self.etags = {}
        # The tag names the inputs' versions: parts uploaded from another version of an input are not reused.
        self.layout = hashlib.sha256(
            json.dumps([tag, [(p.start, p.end, p.source is not None) for p in parts]]).encode()
        ).hexdigest()
        self.upload_id = self._resume() or self._start()

    def _resume(self) -> str | None:
        """The recorded upload of an earlier run of this plan, with the parts S3 already holds."""
        try:
            record = json.loads(self.store.read_small(self.staging, 2**16))
        except (FileNotFoundError, ValueError):
            return None
        if record.get("layout") != self.layout:
            self.store._abort(self.path, record.get("upload_id", ""))
            return None
        sizes = {p.number: p.size for p in self.parts}
        try:
            listed = self._list_parts(record["upload_id"])
        except (FileNotFoundError, ShardmergeError):
            return None  # NoSuchUpload: aborted or expired meanwhile
        self.etags = {n: etag for n, (size, etag) in listed.items() if sizes.get(n) == size}
        return record["upload_id"]

    def _list_parts(self, upload_id: str) -> dict[int, tuple[int, str]]:
        found, marker = {}, {}
        while True:
            page = self.store.call(
                "list_parts", self.path, Bucket=self.path.bucket, Key=self.path.key, UploadId=upload_id, **marker
            )
            found |= {p["PartNumber"]: (p["Size"], p["ETag"]) for p in page.get("Parts", [])}
            if not page.get("IsTruncated"):
                return found
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}

    def _start(self) -> str:
        tagged = {"Metadata": {_TAG_KEY: self.tag}} if self.tag else {}
        upload = self.store.call(
            "create_multipart_upload", self.path, Bucket=self.path.bucket, Key=self.path.key, **tagged
        )
        self.store.put(self.staging, json.dumps({"upload_id": upload["UploadId"], "layout": self.layout}).encode())
        return upload["UploadId"]

    def _overlaps(self, offset: int, length: int):
        """(part index, offset in the part, offset in the caller's range, length) for each part touched."""
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while i < len(self.parts) and self.parts[i].start < end:
            part = self.parts[i]
            a, b = max(offset, part.start), min(end, part.end)
            yield i, a - part.start, a - offset, b - a
            i += 1

    def write(self, buffer, offset: int) -> None:
        view = memoryview(buffer).cast("B")
        for i, at, start, n in self._overlaps(offset, len(view)):
            with self._lock:
                if self.parts[i].number not in self.etags:
                    part = self._buffers.setdefault(i, bytearray(self.parts[i].size))
                    part[at : at + n] = view[start : start + n]
                self._filled[i] += n
                full = self._filled[i] == self.parts[i].size
            if full:
                self._complete(i)

    def copy(self, source: Reader, src_offset: int, offset: int, length: int, scratch_size: int) -> None:
        for i, at, start, n in self._overlaps(offset, length):
            part = self.parts[i]
            if part.source is not None:  # a server-side copy part lies wholly inside this range
                if part.number not in self.etags:  # in the background: the copier goes on noting ranges
                    self._futures.append(self.store.copies.submit(self._copy_part, part))
                continue
            with self._lock:
                self._sources.setdefault(i, []).append((source, src_offset + start, at, n))
                self._filled[i] += n
                full = self._filled[i] == part.size
            if full:
                self._complete(i)

    def _copy_part(self, part: Part) -> None:
        src, src_offset = part.source
        response = self.store.call(
            "upload_part_copy",
            self.path,
            Bucket=self.path.bucket,
            Key=self.path.key,
            UploadId=self.upload_id,
            PartNumber=part.number,
            CopySource={"Bucket": src.bucket, "Key": src.key},
            CopySourceRange=f"bytes={src_offset}-{src_offset + part.size - 1}",
        )
        self.etags[part.number] = response["CopyPartResult"]["ETag"]

    def _complete(self, i: int) -> None:
        """All of part i is in: hand it to an upload thread, which fetches its noted input ranges."""
        part = self.parts[i]
        with self._lock:
            buffer = self._buffers.pop(i, None)
            sources = self._sources.pop(i, [])
        if part.number in self.etags:
            return
        self.store.upload_slots.acquire()
        self._futures.append(self.store.uploads.submit(self._upload, part, buffer, sources))

    def _upload(self, part: Part, buffer: bytearray | None, sources: list) -> None:
        try:
            buffer = buffer if buffer is not None else bytearray(part.size)
            view = memoryview(buffer)
            for reader, src_offset, at, n in sources:
                _read_behind(reader, view[at : at + n], src_offset)
            response = self.store.call(
                "upload_part",
                self.path,
                Bucket=self.path.bucket,
                Key=self.path.key,
                UploadId=self.upload_id,
                PartNumber=part.number,
                Body=buffer,
            )
            self.etags[part.number] = response["ETag"]
        finally:
            self.store.upload_slots.release()

    def publish(self, scratch_size: int) -> dict:
        for future in self._futures:
            future.result()
        missing = [p.number for p in self.parts if p.number not in self.etags]
        if missing:
            raise ShardmergeError(f"{self.path}: parts {missing[:5]} were never written; re-run to finish")
        done = self.store.call(
            "complete_multipart_upload",
            self.path,
            Bucket=self.path.bucket,
            Key=self.path.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": self.etags[p.number]} for p in self.parts]},
        )
        self.store.delete(self.staging)
        return {"etag": done["ETag"]}

    def abort(self) -> None:
        for future in self._futures:
            future.exception()  # wait: an upload finishing after the abort would leave a part behind
        self.store._abort(self.path, self.upload_id)
        self.store.delete(self.staging)


def _read_behind(reader: Reader, view: memoryview, offset: int) -> None:
    """A noted range, read when its part is complete: behind the executor's reads, so straight from the
    object, not through (and not evicting) the read-ahead windows the reader is using."""
    if isinstance(reader, S3Reader):
        reader._get(view, offset)
    else:
        reader.read_into(view, offset)
