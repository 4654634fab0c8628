"""Where files live, behind one small interface: the planner, executor, journal and verify call these
operations and never learn whether they talk to a local disk or an object store.

A location is what the user wrote, parsed once by `location()`: a `pathlib.Path` for a local file or
directory, or a store's own path type (`s3://bucket/key`) with the same `/`, `.name` and `.parent`.
`store_for(location)` gives the store that holds it. Every operation takes locations.

    read      open(path) -> Reader.read_into(buffer, offset); read_small(path, limit); stat(path); list(dir)
    write     create(path, size, staging) -> PendingFile: write at offsets, copy ranges, publish or abort
    publish   put(path, data) replaces a small file atomically; append(path, line) adds a durable line
"""

from __future__ import annotations

from ..errors import ShardmergeError
from .base import PendingFile, Reader, Stat, Store

__all__ = ["PendingFile", "Reader", "Stat", "Store", "is_url", "location", "retries", "store_for"]


def is_url(spec) -> bool:
    """Whether a user's path names an object store (scheme://...) rather than a local path."""
    return isinstance(spec, str) and "://" in spec


def location(spec):
    """The location a user's path names (a Path for local files); a location is returned as it is."""
    import os
    from pathlib import Path

    if is_url(spec):
        scheme = spec.split("://", 1)[0].lower()
        if scheme != "s3":
            raise ShardmergeError(
                f"{spec}: {scheme}:// is not supported; S3-compatible stores (GCS, MinIO, Ceph, R2) "
                "work as s3://bucket/prefix with AWS_ENDPOINT_URL set to their endpoint"
            )
        from .s3 import parse_url

        return parse_url(spec)
    return Path(spec) if isinstance(spec, (str, os.PathLike)) else spec


def store_for(path) -> Store:
    """The store that holds a location: its own, or the local disk for a Path."""
    store = getattr(path, "store", None)
    if store is not None:
        return store
    from .local import LOCAL

    return LOCAL


def retries() -> int:
    """Transient errors that the object stores retried so far in this process."""
    import sys

    s3 = sys.modules.get(__name__ + ".s3")
    return s3.retries() if s3 is not None else 0
