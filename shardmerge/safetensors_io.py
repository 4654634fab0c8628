"""The safetensors format, read and written by byte range.

A file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data;
offsets are relative to the first byte after the header. We parse and validate headers ourselves so
that a hostile or truncated file is refused before any allocation it could drive, and we read and
write tensors by byte range at known offsets (through stores) so no shard is ever loaded or mapped whole.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ShardmergeError
from .stores import location, store_for
from .units import SHARE_BLOCK

# Bytes per element of each dtype safetensors defines with a whole-byte size.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# The reference implementation refuses headers above 100 MB; a 405B model's largest is ~100 KB.
MAX_HEADER_BYTES = 100 * 1000 * 1000
ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: `offset` is absolute in `path`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes in one slice along dim 0 (the unit a tile is made of)."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]

    def rows(self, r0: int, r1: int) -> TensorInfo:
        """Rows r0:r1 along dim 0, as a tensor of their own (its bytes are contiguous)."""
        if (r0, r1) == (0, self.shape[0] if self.shape else 1):
            return self
        shape = (r1 - r0, *self.shape[1:])
        return TensorInfo(
            self.name, self.dtype, shape, self.path, self.offset + r0 * self.row_bytes, (r1 - r0) * self.row_bytes
        )


@dataclass
class ShardHeader:
    path: Path
    file_size: int
    data_start: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # in data order


def _name(name: str, limit: int = 120) -> str:
    """A tensor name for a message: quoted, and cut short if a hostile header made it huge."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def _fail(path: Path, why: str) -> ShardmergeError:
    return ShardmergeError(f"{path}: not a valid safetensors file: {why}")


def _reject_duplicates(path: Path):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise _fail(path, f"tensor {_name(key)} appears twice in the header")
            seen[key] = value
        return seen

    return hook


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path) -> ShardHeader:
    """Parse and validate the header of a safetensors file without reading its data."""
    path = location(path)
    store = store_for(path)
    stat = store.stat(path)
    if stat is None:
        raise ShardmergeError(f"{path}: cannot read: not found or not a file")
    file_size = stat.size
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
    reader = store.open(path)
    try:
        prefix = bytearray(8)
        reader.read_into(prefix, 0)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > file_size:
            raise _fail(path, f"header length {header_len} runs past the end of the {file_size}-byte file (truncated?)")
        raw = bytearray(header_len)
        reader.read_into(raw, 8)
    except OSError as e:
        raise ShardmergeError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        reader.close()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "header is not UTF-8") from None
    if not text.startswith("{"):
        raise _fail(path, "header is not a JSON object")
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicates(path))
    except (ValueError, RecursionError) as e:
        if isinstance(e, ShardmergeError):
            raise
        raise _fail(path, f"header is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(parsed, dict):
        raise _fail(path, "header is not a JSON object")
    return _validate(path, parsed, file_size, 8 + header_len)


def _validate(path: Path, parsed: dict, file_size: int, data_start: int) -> ShardHeader:
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_size = file_size - data_start
    entries = []
    for name, entry in parsed.items():
        where = f"tensor {_name(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _fail(path, f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _fail(path, f"{where}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _fail(path, f"{where}: data_offsets {offsets} are not an increasing range")
        if end > data_size:
            raise _fail(
                path,
                f"{where}: data_offsets {offsets} run past the end of the data ({data_size} bytes; truncated file?)",
            )
        expected = DTYPE_SIZES[dtype]
        for d in shape:  # capped as the reference's checked_mul: a huge shape must not cost big-int time
            expected *= d
            if expected >= 2**64:
                raise _fail(path, f"{where}: shape {str(shape)[:100]} is too large")
        if expected != end - begin:
            raise _fail(
                path,
                f"{where}: shape {str(shape)[:100]} of {dtype} needs {expected} bytes but data_offsets "
                f"span {end - begin}",
            )
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    header = ShardHeader(path=path, file_size=file_size, data_start=data_start, metadata=metadata)
    previous_end, previous_name = 0, None
    for begin, end, name, dtype, shape in entries:
        if begin < previous_end:
            raise _fail(path, f"tensors {_name(previous_name)} and {_name(name)} overlap")
        if end > begin:
            previous_end, previous_name = end, name
        header.tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return header


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None, like: int | None = None
) -> tuple[bytes, list[int]]:
    """Header bytes for tensors laid out back to back in the given order.

    `entries` are (name, dtype, shape, nbytes). Returns the full prefix (length + JSON, padded with trailing
    spaces, which JSON readers skip, as the reference writer pads to 8 bytes) and each tensor's absolute offset
    in the file. `like` is the data start of a base file whose layout this one keeps: the prefix is padded to
    exactly that length when it fits, else to the next length congruent to it modulo SHARE_BLOCK, so that
    tensors copied from the base sit at block-aligned offsets relative to their source and can share its
    extents. The padding depends on the inputs only, never on the filesystem.
    """
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offsets, cursor = [], 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets.append(cursor)
        cursor += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * _padding(8 + len(text), like)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, [len(prefix) + o for o in offsets]


def _padding(length: int, like: int | None) -> int:
    if like is None or like % ALIGNMENT:
        return -length % ALIGNMENT
    if length <= like:
        return like - length
    return (like - length) % SHARE_BLOCK
