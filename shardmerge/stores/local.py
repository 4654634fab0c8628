"""Files on a local disk: pread/pwrite at known offsets, kernel-side copies (copy_file_range), and the
write-to-scratch, fsync, rename, fsync-the-directory sequence that makes a published file durable.

No shard is ever loaded or mapped whole: reads and writes go through the caller's buffers, or (Mapped) a
window of one tile that the plan charges like a buffer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
from pathlib import Path

from .. import libc
from ..errors import ShardmergeError
from ..units import IO_BUFFER, SHARE_BLOCK, MiB
from .base import PendingFile, Reader, Stat, Store

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
_COPY_BUFFER = MiB  # config and tokenizer files, copied whole; used only when the kernel cannot copy
_TAG_XATTR = "user.shardmerge"  # a published file's tag and checksum, for a resume to prove what it is
_SYNC_FILE_RANGE = libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_MADVISE = libc.function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)  # through ctypes: GIL let go
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range we just wrote to disk, without waiting for it.

    Dirty pages otherwise wait in the page cache until a tenth of RAM is dirty or the shard's fsync, so the
    disk idles while we merge and then the fsync waits for the whole shard; started as each range is
    written, the disk works beside the merge and the fsync finds little left (on the 1.9 GB benchmark model
    the finishing stage's busy time drops from 1.7-2.3 s to 0.5-0.8 s). A hint only: where the call is missing or
    fails, the fsync still makes everything durable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _ended(path: Path, at: int) -> ShardmergeError:
    return ShardmergeError(f"{path}: file ended at byte {at} while reading; truncated or changed during the merge")


def pread_into(fd: int, buffer, offset: int, path: Path) -> None:
    """Fill `buffer` (a writable buffer) from `fd` at `offset`; a short file is an error naming `path`."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise _ended(path, offset + done)
        done += n


def pwrite_all(fd: int, buffer, offset: int) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(
    src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int, scratch_size: int, block: int = SHARE_BLOCK
) -> None:
    """Copy bytes file to file, in the kernel where it can (copy_file_range), else through one buffer of
    at most `scratch_size` bytes, allocated only when the fallback is needed.

    Where source and destination offsets agree modulo `block`, the bytes up to the first block boundary go in
    a call of their own: the kernel clones extents (XFS reflink, btrfs) only for ranges starting on a block,
    and copies an unaligned range whole. The rest then starts aligned and shares every whole block."""
    done = 0
    if hasattr(os, "copy_file_range"):
        head = (-dst_offset) % block if (src_offset - dst_offset) % block == 0 else 0
        try:
            for end in ([head] if 0 < head < length else []) + [length]:
                done = _kernel_copy(src_fd, dst_fd, src_offset, dst_offset, done, end)
            if done == length:
                return
        except OSError as e:
            # EXDEV/EINVAL/ENOSYS/EOPNOTSUPP: this pair of filesystems cannot do it; fall back.
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
    scratch = memoryview(bytearray(min(length - done, scratch_size)))
    while done < length:
        chunk = scratch[: min(len(scratch), length - done)]
        n = os.preadv(src_fd, [chunk], src_offset + done)
        if n == 0:
            raise ShardmergeError(f"source ended at byte {src_offset + done} while copying; truncated input?")
        pwrite_all(dst_fd, chunk[:n], dst_offset + done)
        done += n


def _kernel_copy(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, done: int, end: int) -> int:
    """copy_file_range bytes done:end of a range; returns how far it got (short only at the source's end)."""
    while done < end:
        n = os.copy_file_range(src_fd, dst_fd, end - done, src_offset + done, dst_offset + done)
        if n == 0:
            break
        done += n
    return done


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a small file so that readers see the old contents or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_checksum(path: Path, buffer_size: int = IO_BUFFER, mapped: bool = False) -> str:
    """XXH3-128 of a whole file (`xxhsum -H2` prints the same), read through one fixed buffer.

    Checksums guard against corruption, not forgery, and XXH3 runs at memory speed (~20 GB/s here,
    against 1.7 GB/s for SHA-256), so checksumming stays off the critical path of a merge. `mapped`
    hashes through read-only mmap windows of `buffer_size` instead of copying: ~40% less system
    time and no buffer, for files only we are writing (a file truncated under a mapping would raise SIGBUS)."""
    import mmap

    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        if mapped:
            size, window = os.fstat(f.fileno()).st_size, max(buffer_size // mmap.ALLOCATIONGRANULARITY, 1)
            window *= mmap.ALLOCATIONGRANULARITY
            for offset in range(0, size, window):
                with mmap.mmap(f.fileno(), min(window, size - offset), access=mmap.ACCESS_READ, offset=offset) as m:
                    h.update(m)
        else:
            buffer = memoryview(bytearray(buffer_size))
            while n := f.readinto(buffer):
                h.update(buffer[:n])
    return h.hexdigest()


class LocalReader(Reader):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        except OSError as e:
            raise ShardmergeError(f"{path}: cannot open: {e.strerror}") from None

    def read_into(self, buffer, offset: int) -> None:
        pread_into(self.fd, buffer, offset, self.path)

    def map(self, offset: int, length: int) -> Mapped | None:
        size = os.fstat(self.fd).st_size
        if size < offset + length:
            raise _ended(self.path, size)
        try:
            return Mapped(self.fd, offset, length, self.path)
        except OSError:
            return None  # a filesystem that cannot map files (some FUSE mounts): the caller reads the range instead

    def close(self) -> None:
        os.close(self.fd)


class Mapped:
    """A window on a cached file range, paged in before it is handed on, that nothing writes.

    Reading a merged tensor in place instead of pread-ing it into a slab saves the kernel's copy: on the
    1.9 GB benchmark model, user+system CPU for reading and widening its merged tensors drops from 0.9 s to
    0.45 s, and the widening itself is faster from the page cache than from a buffer the kernel just wrote.
    The window is mapped pages, which count in RSS: the plan charges one per tile in flight
    (Buffers.mapped_bytes), and closing it gives them back. `view` is the range's bytes (the mapping starts
    on a page boundary). A file cut short before the window is mapped is an error naming it; one truncated
    by another program in the milliseconds between mapping and merging ends the process with SIGBUS (no
    output is published, and a rerun resumes)."""

    def __init__(self, fd: int, offset: int, length: int, path: Path):
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)  # one large read where it is cold
        # Private (copy on write, and nothing writes) because torch views only writable buffers quietly.
        self._map = mmap.mmap(fd, offset - start + length, access=mmap.ACCESS_COPY, offset=start)
        # Paged in here, on the reader's thread: a page missing later would stall the merge on the disk.
        if _MADVISE is not None:
            window = (ctypes.c_char * len(self._map)).from_buffer(self._map)
            failed = _MADVISE(ctypes.addressof(window), len(self._map), _MADV_POPULATE_READ)
            del window  # a buffer export would keep the mapping from closing
            code = ctypes.get_errno() if failed else 0
            if code not in (0, errno.EINVAL):  # EINVAL: a kernel before 5.14; pages then fault in as they are read
                self._map.close()
                raise ShardmergeError(
                    f"{path}: reading bytes {offset}..{offset + length} failed ({os.strerror(code)}); truncated or "
                    "changed during the merge?"
                )
        self.view = memoryview(self._map)[offset - start :]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class LocalPending(PendingFile):
    """Written under `staging`, then fsynced, checksummed and renamed to its final name."""

    def __init__(self, path: Path, size: int, staging: Path, tag: str = ""):
        self.path, self.staging, self.tag = path, staging, tag
        self.fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            self.abort()
            raise

    def write(self, buffer, offset: int) -> None:
        pwrite_all(self.fd, buffer, offset)
        start_writeback(self.fd, offset, memoryview(buffer).nbytes)

    def copy(self, source: Reader, src_offset: int, offset: int, length: int, scratch_size: int) -> None:
        if isinstance(source, LocalReader):
            copy_range(source.fd, self.fd, src_offset, offset, length, scratch_size)
        else:
            scratch = memoryview(bytearray(min(length, scratch_size)))
            for start in range(0, length, len(scratch)):
                chunk = scratch[: min(len(scratch), length - start)]
                source.read_into(chunk, src_offset + start)
                pwrite_all(self.fd, chunk, offset + start)
        start_writeback(self.fd, offset, length)

    def publish(self, scratch_size: int) -> dict:
        os.fsync(self.fd)
        digest = file_checksum(self.staging, scratch_size, mapped=True)
        if self.tag:
            _keep_tag(self.fd, self.tag, digest)
        # Written, synced and checksummed: its pages need not crowd out the next shard's (on a node merging
        # 140 GB, reclaiming our own clean pages is cheaper than the kernel scanning for them).
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.staging, self.path)
        fsync_dir(self.path.parent)
        return {"xxh3_128": digest}

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.staging.unlink(missing_ok=True)


def _keep_tag(fd: int, tag: str, digest: str) -> None:
    """Keep the tag and the checksum of the synced contents with the file, before it takes its final name.
    Whatever of it a crash loses only makes the file unprovable, so redone; a filesystem without user
    xattrs (some network filesystems) keeps nothing, and its shards are redone the same way."""
    try:
        os.setxattr(fd, _TAG_XATTR, json.dumps({"tag": tag, "xxh3_128": digest}).encode())
    except OSError:
        pass


class _Lock:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalStore(Store):
    maps_files = True

    def open(self, path: Path, readahead: bool = False) -> Reader:
        return LocalReader(path)  # the kernel's readahead (advised sequential) serves both kinds of reads

    def stat(self, path: Path) -> Stat | None:
        try:
            st = path.stat()
        except (OSError, ValueError):
            return None
        if not path.is_file():
            return None
        real = path.resolve()
        if real.parent.name == "blobs" and real.parent.parent.name.startswith(("models--", "datasets--")):
            return Stat(st.st_size, f"blob:{real.name}")  # the Hub cache names a blob by its content hash
        # A rewrite in place changes mtime and ctime (which cannot be set back), a replacement the inode.
        return Stat(st.st_size, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def list(self, directory: Path) -> list[Path]:
        try:
            return sorted(directory.iterdir())
        except FileNotFoundError:
            return []

    def read_small(self, path: Path, limit: int) -> bytes:
        with open(path, "rb") as f:
            return f.read(limit + 1)

    def real(self, path: Path) -> Path:
        return path.resolve()

    def contains(self, root: Path, path: Path) -> bool:
        return path.resolve().is_relative_to(root)

    def create(self, path: Path, size: int, staging: Path, copies=(), tag: str = "") -> PendingFile:
        return LocalPending(path, size, staging, tag)

    def adopt(self, path: Path, size: int, tag: str, scratch_size: int) -> dict | None:
        try:
            kept = json.loads(os.getxattr(path, _TAG_XATTR, follow_symlinks=False))
            if not path.is_file() or path.lstat().st_size != size:
                return None
        except (OSError, ValueError):
            return None
        if not isinstance(kept, dict) or kept.get("tag") != tag:
            return None
        digest = file_checksum(path, scratch_size)  # unchanged since it was published
        return {"xxh3_128": digest} if digest == kept.get("xxh3_128") else None

    def put(self, path: Path, data: bytes) -> None:
        atomic_write(path, data)

    def append(self, path: Path, line: bytes) -> None:
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":
                line = b"\n" + line  # a line torn by a kill mid-append stays torn; this one starts clean
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def copy_file(self, source_store: Store, source, path: Path, staging: Path) -> int:
        size = source_store.stat(source).size
        pending, reader = LocalPending(path, size, staging), source_store.open(source)
        try:
            pending.copy(reader, 0, 0, size, _COPY_BUFFER)
            os.fsync(pending.fd)
        except BaseException:
            pending.abort()
            raise
        finally:
            reader.close()
        os.close(pending.fd)
        pending.fd = -1
        os.replace(staging, path)
        fsync_dir(path.parent)
        return size

    def checksum(self, path: Path, scratch_size: int) -> dict:
        return {"xxh3_128": file_checksum(path, scratch_size)}

    def delete(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def make_dirs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def remove_empty_dir(self, directory: Path) -> None:
        try:
            directory.rmdir()
        except OSError:
            pass

    def lock(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return _Lock(fd)


LOCAL = LocalStore()
