"""The storage interface itself: the types every store implements (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """A file's size and what identifies this version of its contents (inode and mtime on a local disk,
    the ETag or version id in an object store): a changed identity means the input changed."""

    size: int
    identity: str


class Reader(ABC):
    """An open input file; `read_into` may be called from several threads at once."""

    path: object

    @abstractmethod
    def read_into(self, buffer, offset: int) -> None:
        """Fill `buffer` (a writable buffer) from `offset`; a short file is an error naming the file."""

    def map(self, offset: int, length: int):
        """A mapping of `length` bytes from `offset`, paged in, as a `Mapped` where the store's `maps_files`
        holds; None where this file cannot be mapped (any other store's), and the caller reads the range instead."""
        return None

    def close(self) -> None:  # noqa: B027 - most readers hold nothing to release
        return

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PendingFile(ABC):
    """A file being written at planned offsets; invisible under its name until `publish`."""

    @abstractmethod
    def write(self, buffer, offset: int) -> None:
        pass

    @abstractmethod
    def copy(self, source: Reader, src_offset: int, offset: int, length: int, scratch_size: int) -> None:
        """Copy a range of an input without passing it through Python where the store can (kernel copy,
        server-side copy); otherwise through one buffer of at most `scratch_size` bytes."""

    @abstractmethod
    def publish(self, scratch_size: int) -> dict:
        """Make the file durable and visible under its final name; returns its checksum record, the
        same that `Store.checksum` gives for the published file."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; nothing appears under the final name."""


class Store(ABC):
    # Whether Reader.map works: input ranges can be read in place, without a copy into a buffer of ours.
    maps_files = False
    # Whether staged work of a killed run (an open multipart upload) can be taken up again by the next run;
    # a local partial file cannot (what reached the disk is unknown), so it is dropped.
    resumes_partials = False

    @abstractmethod
    def open(self, path, readahead: bool = False) -> Reader:
        """An input file to read ranges of; with `readahead` a store may fetch more than a small read asks
        for and serve the next small reads from it (the executor's factor loads), never for a header."""

    @abstractmethod
    def stat(self, path) -> Stat | None:
        """The file's size and identity, or None when there is no such file."""

    @abstractmethod
    def is_dir(self, path) -> bool:
        pass

    @abstractmethod
    def list(self, directory) -> list:
        """The files and sub-directories directly inside `directory`, sorted; [] when it does not exist."""

    @abstractmethod
    def read_small(self, path, limit: int) -> bytes:
        """A whole small file (config, index, journal); at most `limit` + 1 bytes are read, so a caller
        can refuse a file larger than it expects. FileNotFoundError when it does not exist."""

    @abstractmethod
    def real(self, path):
        """`path` with links resolved; itself in a store that has no links."""

    @abstractmethod
    def contains(self, root, path) -> bool:
        """Whether `path`, links followed, stays inside the directory `root`."""

    @abstractmethod
    def create(self, path, size: int, staging, copies=(), tag: str = "") -> PendingFile:
        """A new file of `size` bytes to be published as `path`; a store that needs a scratch file for it
        (a local disk: written there, renamed into place) or a record of it (an object store: its upload id)
        puts it at `staging`. `copies` are the (source path, source offset, offset, length) ranges that will
        be `copy`'d in, so that a store can plan server-side copies for them. A store that can keep `tag`
        with the published file (what the file is: see `adopt`) does."""

    def adopt(self, path, size: int, tag: str, scratch_size: int) -> dict | None:
        """The checksum record of the published file at `path` if the store can prove it is the file that
        `create(..., tag=tag)` published: `tag` kept with it, `size` bytes, and unchanged since (where the
        store kept a checksum with it). None where it cannot: such a file is written again."""
        return None

    @abstractmethod
    def put(self, path, data: bytes) -> None:
        """Replace a small file atomically: readers see the old contents or the new, never a part."""

    @abstractmethod
    def append(self, path, line: bytes) -> None:
        """Add one durable line to a journal file (created when missing)."""

    @abstractmethod
    def copy_file(self, source_store: Store, source, path, staging) -> int:
        """Copy a whole file from any store (`source` in `source_store`) to `path`, atomically and durably;
        returns its size."""

    @abstractmethod
    def checksum(self, path, scratch_size: int) -> dict:
        """The checksum record of a published file, comparable with what `PendingFile.publish` returned."""

    @abstractmethod
    def delete(self, path) -> None:
        """Remove a file or a directory tree; a missing one is not an error."""

    @abstractmethod
    def make_dirs(self, directory) -> None:
        pass

    @abstractmethod
    def remove_empty_dir(self, directory) -> None:
        """Remove `directory` if it is empty; one that still holds something (another run's) stays."""

    @abstractmethod
    def lock(self, path):
        """Hold `path` exclusively for this run: a handle with release(), or None if another run holds it."""

    def abort_uploads(self, directory) -> int:
        """Abort the unfinished uploads to keys under `directory` (kept out of listings by object stores);
        returns how many. Nothing to do where files are written in place."""
        return 0

    def write_memory(self) -> int:
        """Host memory this store holds for writes (part buffers), taken out of max_memory."""
        return 0
