"""Unit tests for shardmerge.safetensors_io: header round trip, every way a header is refused, byte copies.

Every refusal must be a ShardmergeError whose one-line message names the file (and the tensor, where one
is at fault), never a stray TypeError/ValueError/OSError.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardmerge import safetensors_io as sio
from shardmerge.errors import ShardmergeError
from shardmerge.safetensors_io import MAX_HEADER_BYTES, encode_header, read_header
from shardmerge.stores.local import LOCAL, copy_range, pread_into, pwrite_all

# --------------------------------------------------------------------------------------------- helpers


def write_raw(path, header: bytes, data: bytes = b"", header_len: int | None = None):
    """A file with an explicit 8-byte length prefix (defaults to len(header)), the header bytes, then data."""
    n = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def write_json(path, header, data_len: int = 0):
    """A file whose header is `header` (a dict, or a str of raw JSON text) followed by `data_len` bytes."""
    text = header if isinstance(header, str) else json.dumps(header)
    return write_raw(path, text.encode("utf-8"), bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(path, *also: str) -> str:
    """read_header(path) must raise ShardmergeError naming the file (and each of `also`); returns the message."""
    with pytest.raises(ShardmergeError) as info:
        read_header(path)
    message = str(info.value)
    assert path.name in message, message
    for word in also:
        assert word in message, message
    assert "\n" not in message, message
    return message


TORCH_TO_ST = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_with_encode_header(path, tensors: dict[str, torch.Tensor], metadata=None):
    entries = [(n, TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()]
    prefix, offsets = encode_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for t, offset in zip(tensors.values(), offsets):
            assert f.tell() == offset
            f.write(tensor_bytes(t))
    return prefix, offsets


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(5, 3, generator=g),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "u8": torch.arange(0, 9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ünïcode name ✓": torch.ones(1, dtype=torch.int16),
    }


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_header_fields_match_what_was_encoded(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "rt.safetensors"
    prefix, offsets = write_with_encode_header(path, tensors, {"format": "pt"})
    header = read_header(path)
    assert list(header.tensors) == list(tensors)  # back-to-back layout: data order == given order
    assert header.data_start == len(prefix)
    assert header.file_size == path.stat().st_size
    assert header.metadata == {"format": "pt"}
    for (name, t), offset in zip(tensors.items(), offsets):
        info = header.tensors[name]
        assert info.name == name
        assert info.dtype == TORCH_TO_ST[t.dtype]
        assert info.shape == tuple(t.shape)
        assert info.offset == offset
        assert info.nbytes == t.numel() * t.element_size()
        assert info.path == path


def test_round_trip_file_loads_in_safetensors_with_equal_tensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "rt.safetensors"
    write_with_encode_header(path, tensors, {"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == t.dtype and loaded.shape == t.shape
            assert tensor_bytes(loaded) == tensor_bytes(t), name


def test_round_trip_pread_returns_the_tensor_bytes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "rt.safetensors"
    write_with_encode_header(path, tensors)
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, t in tensors.items():
            info = header.tensors[name]
            buf = bytearray(info.nbytes)
            pread_into(fd, buf, info.offset, path)
            assert bytes(buf) == tensor_bytes(t), name
    finally:
        os.close(fd)


def test_reads_header_written_by_reference_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt"}
    for name, t in tensors.items():
        assert header.tensors[name].shape == tuple(t.shape)
        assert header.tensors[name].dtype == TORCH_TO_ST[t.dtype]


def test_encode_header_without_metadata_has_no_metadata_key(tmp_path):
    prefix, _ = encode_header([("a", "F32", (1,), 4)], None)
    assert "__metadata__" not in json.loads(prefix[8:])
    path = tmp_path / "nometa.safetensors"
    path.write_bytes(prefix + bytes(4))
    assert read_header(path).metadata is None


@pytest.mark.parametrize("name_len", range(1, 9))
def test_encode_header_pads_prefix_to_8_bytes(name_len):
    prefix, offsets = encode_header([("x" * name_len, "F32", (1,), 4), ("y", "U8", (3,), 3)], None)
    (n,) = struct.unpack("<Q", prefix[:8])
    assert len(prefix) == 8 + n
    assert len(prefix) % 8 == 0
    assert offsets[0] == len(prefix)  # first tensor aligned
    assert prefix[8:].rstrip(b" ") == prefix[8:].strip()  # padding is trailing spaces only
    json.loads(prefix[8:])  # padding keeps it valid JSON


def test_encode_header_offsets_are_back_to_back():
    prefix, offsets = encode_header([("a", "F32", (2, 3), 24), ("b", "BF16", (5,), 10), ("c", "U8", (0,), 0)], {})
    assert offsets == [len(prefix), len(prefix) + 24, len(prefix) + 34]
    parsed = json.loads(prefix[8:])
    assert parsed["a"]["data_offsets"] == [0, 24]
    assert parsed["b"]["data_offsets"] == [24, 34]
    assert parsed["c"]["data_offsets"] == [34, 34]


def test_empty_header_is_accepted(tmp_path):
    path = write_raw(tmp_path / "empty.safetensors", b"{}      ")
    header = read_header(path)
    assert header.tensors == {} and header.metadata is None


def test_zero_size_tensor_at_the_boundary_of_another_is_accepted(tmp_path):
    path = write_json(
        tmp_path / "z.safetensors", {"a": entry("F32", (2,), (0, 8)), "z": entry("F32", (0, 3), (8, 8))}, 8
    )
    assert set(read_header(path).tensors) == {"a", "z"}


def test_tensor_info_offset_is_absolute(tmp_path):
    path = write_json(tmp_path / "abs.safetensors", {"a": entry("U8", (4,), (0, 4)), "b": entry("U8", (2,), (4, 6))}, 6)
    header = read_header(path)
    assert header.tensors["b"].offset == header.data_start + 4
    assert header.tensors["a"].row_bytes == 1


# ------------------------------------------------------------------------------ refusals: the 8-byte prefix


def test_rejects_empty_file(tmp_path):
    path = tmp_path / "zero.safetensors"
    path.write_bytes(b"")
    refused(path)


def test_rejects_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\x00\x00")
    refused(path)


def test_rejects_header_length_beyond_file(tmp_path):
    path = write_raw(tmp_path / "long.safetensors", b'{"a":1}', header_len=1000)
    refused(path, "1000")


def test_rejects_absurd_header_length(tmp_path):
    path = write_raw(tmp_path / "absurd.safetensors", b"{}", header_len=2**63 + 5)
    refused(path)


def test_rejects_header_length_just_over_limit_without_reading_it(tmp_path, monkeypatch):
    # The file is sparse: a length prefix of limit+1 followed by a hole; refusal must come from the limit,
    # before the header is read (only the 8-byte length prefix is).
    path = tmp_path / "limit.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(8 + MAX_HEADER_BYTES + 1)
    reads = []
    real_open = LOCAL.open

    def spied_open(file, *args, **kwargs):
        reader = real_open(file, *args, **kwargs)
        real_read = reader.read_into

        def read_into(buffer, offset):
            reads.append(len(memoryview(buffer)))
            return real_read(buffer, offset)

        reader.read_into = read_into
        return reader

    monkeypatch.setattr(LOCAL, "open", spied_open)
    refused(path, str(MAX_HEADER_BYTES))
    assert reads == [8]


def test_rejects_missing_file_naming_it(tmp_path):
    refused(tmp_path / "does-not-exist.safetensors")


def test_rejects_directory_in_place_of_file(tmp_path):
    path = tmp_path / "adir.safetensors"
    path.mkdir()
    refused(path)


# ----------------------------------------------------------------------------- refusals: the JSON itself


def test_rejects_non_utf8_header(tmp_path):
    refused(write_raw(tmp_path / "latin.safetensors", b'{"\xff\xfe": 1}'))


def test_rejects_non_json_header(tmp_path):
    refused(write_raw(tmp_path / "garbage.safetensors", b"{this is not json"))


def test_rejects_truncated_json_header(tmp_path):
    refused(write_raw(tmp_path / "cut.safetensors", b'{"a": {"dtype": "F32", "sha'))


def test_rejects_json_array_header(tmp_path):
    refused(write_raw(tmp_path / "array.safetensors", b"[]"))


@pytest.mark.parametrize("text", [b'"a string"', b"123", b"null", b"true", b""])
def test_rejects_json_scalar_header(tmp_path, text):
    refused(write_raw(tmp_path / "scalar.safetensors", text))


def test_rejects_trailing_garbage_after_json_object(tmp_path):
    refused(write_raw(tmp_path / "trail.safetensors", b"{} {}"))


def test_rejects_deeply_nested_json(tmp_path):
    text = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    refused(write_raw(tmp_path / "deep.safetensors", text))


def test_rejects_number_too_long_to_parse(tmp_path):
    text = '{"a":{"dtype":"U8","shape":[' + "9" * 6000 + '],"data_offsets":[0,1]}}'
    refused(write_json(tmp_path / "digits.safetensors", text, 1))


def test_rejects_duplicate_tensor_names(tmp_path):
    text = '{"w":' + json.dumps(entry("U8", (1,), (0, 1))) + ',"w":' + json.dumps(entry("U8", (1,), (1, 2))) + "}"
    refused(write_json(tmp_path / "dup.safetensors", text, 2), "'w'")


# ----------------------------------------------------------------------------- refusals: metadata


@pytest.mark.parametrize("metadata", [[], "x", 3, {"k": 1}, {"k": None}, {"k": ["v"]}])
def test_rejects_metadata_that_is_not_string_to_string(tmp_path, metadata):
    path = write_json(tmp_path / "meta.safetensors", {"__metadata__": metadata, "a": entry("U8", (1,), (0, 1))}, 1)
    refused(path, "__metadata__")


def test_accepts_null_metadata(tmp_path):
    path = write_json(tmp_path / "meta.safetensors", {"__metadata__": None, "a": entry("U8", (1,), (0, 1))}, 1)
    assert read_header(path).metadata is None


# ----------------------------------------------------------------------------- refusals: entries


def test_rejects_unknown_dtype(tmp_path):
    refused(write_json(tmp_path / "dt.safetensors", {"w": entry("F33", (2,), (0, 8))}, 8), "'w'", "F33")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, None, 4, True])
def test_rejects_non_string_dtype(tmp_path, dtype):
    # Unhashable dtypes ([...] / {...}) used to escape as TypeError from `dtype in DTYPE_SIZES`.
    refused(write_json(tmp_path / "dtype.safetensors", {"w": entry(dtype, (2,), (0, 8))}, 8), "'w'")


@pytest.mark.parametrize("dtype", ["f32", "float32", "", "F32 "])
def test_rejects_dtype_spelled_differently(tmp_path, dtype):
    refused(write_json(tmp_path / "dt.safetensors", {"w": entry(dtype, (2,), (0, 8))}, 8), "'w'")


def test_rejects_shape_and_byte_range_disagreeing(tmp_path):
    refused(write_json(tmp_path / "span.safetensors", {"w": entry("F32", (3,), (0, 8))}, 12), "'w'")


def test_rejects_byte_range_one_byte_short_of_shape(tmp_path):
    refused(write_json(tmp_path / "span.safetensors", {"w": entry("BF16", (2, 2), (0, 7))}, 8), "'w'")


def test_rejects_offsets_past_end_of_truncated_file(tmp_path):
    refused(write_json(tmp_path / "trunc.safetensors", {"w": entry("F32", (4,), (0, 16))}, 15), "'w'")


def test_rejects_truncated_file_with_valid_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(8), "b": torch.zeros(16)}, str(path))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    message = refused(path)
    assert "'b'" in message  # the tensor whose bytes were cut off (last in data order)


def test_rejects_overlapping_ranges(tmp_path):
    path = write_json(
        tmp_path / "overlap.safetensors", {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (4, 12))}, 12
    )
    refused(path, "'a'", "'b'")


def test_rejects_identical_ranges(tmp_path):
    path = write_json(
        tmp_path / "same.safetensors", {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))}, 8
    )
    refused(path, "'a'", "'b'")


def test_rejects_range_contained_in_another(tmp_path):
    path = write_json(
        tmp_path / "inner.safetensors", {"outer": entry("U8", (10,), (0, 10)), "inner": entry("U8", (2,), (3, 5))}, 10
    )
    refused(path, "'outer'", "'inner'")


def test_rejects_decreasing_offsets(tmp_path):
    refused(write_json(tmp_path / "dec.safetensors", {"w": entry("U8", (0,), (8, 4))}, 8), "'w'")


def test_rejects_negative_offset(tmp_path):
    refused(write_json(tmp_path / "neg.safetensors", {"w": entry("U8", (2,), (-2, 0))}, 8), "'w'")


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [0.0, 4.0], [False, True], ["0", "4"], None, {"0": 4}, 4])
def test_rejects_malformed_data_offsets(tmp_path, offsets):
    bad = {"dtype": "U8", "shape": [4], "data_offsets": offsets}
    refused(write_json(tmp_path / "offs.safetensors", {"w": bad}, 8), "'w'")


@pytest.mark.parametrize(
    "shape", [[True, 2], [False], [-1, 0], [-2, -4], [2.0], [1.5], ["2"], [None], [[2]], 2, "2", None, {"0": 2}]
)
def test_rejects_shape_that_is_not_a_list_of_non_negative_ints(tmp_path, shape):
    bad = {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}
    refused(write_json(tmp_path / "shape.safetensors", {"w": bad}, 8), "'w'")


@pytest.mark.parametrize("drop", ["dtype", "shape", "data_offsets"])
def test_rejects_entry_missing_a_key(tmp_path, drop):
    bad = entry("U8", (2,), (0, 2))
    del bad[drop]
    refused(write_json(tmp_path / "missing.safetensors", {"w": bad}, 2), "'w'")


def test_rejects_entry_with_extra_key(tmp_path):
    bad = entry("U8", (2,), (0, 2)) | {"extra": 1}
    refused(write_json(tmp_path / "extra.safetensors", {"w": bad}, 2), "'w'")


@pytest.mark.parametrize("value", [[], "F32", 7, None, True])
def test_rejects_entry_that_is_not_an_object(tmp_path, value):
    refused(write_json(tmp_path / "junk.safetensors", {"w": value}, 2), "'w'")


def test_rejects_shape_whose_product_is_huge(tmp_path):
    # 200 dims of 2**63: product ~ 10**3800. Must be a one-line ShardmergeError, not a ValueError from printing
    # an integer past Python's 4300-digit str() limit.
    text = '{"w":{"dtype":"U8","shape":[' + ",".join([str(2**63)] * 200) + '],"data_offsets":[0,1]}}'
    refused(write_json(tmp_path / "huge.safetensors", text, 1), "'w'")


def test_rejects_shape_whose_product_has_more_than_4300_digits(tmp_path):
    text = '{"w":{"dtype":"U8","shape":[' + ",".join([str(10**2000)] * 3) + '],"data_offsets":[0,1]}}'
    refused(write_json(tmp_path / "digits.safetensors", text, 1), "'w'")


def test_long_shape_is_refused_quickly(tmp_path):
    # A ~2 MB header with a million-dim shape must be refused in linear time (a running product capped at the
    # data size, as the reference's checked_mul does), not after a quadratic big-int product. Run in a child so a
    # regression fails in 5 s instead of hanging the suite.
    path = tmp_path / "longshape.safetensors"
    text = '{"w":{"dtype":"F32","shape":[' + ",".join(["3"] * 1_000_000) + '],"data_offsets":[0,4]}}'
    write_json(path, text, 4)
    code = textwrap.dedent(f"""
        from shardmerge.safetensors_io import read_header
        from shardmerge.errors import ShardmergeError
        try:
            read_header({str(path)!r})
        except ShardmergeError as e:
            print(len(str(e)))
        else:
            raise SystemExit("accepted")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("read_header took over 5 s on a 2 MB header with a million-dimension shape")
    assert done.returncode == 0, done.stderr[-2000:]


def test_error_message_for_long_shape_stays_short(tmp_path):
    # One clear line: a header cannot make the message megabytes long by echoing its shape back.
    text = '{"w":{"dtype":"U8","shape":[' + ",".join(["1"] * 100_000) + ',0],"data_offsets":[0,4]}}'
    message = refused(write_json(tmp_path / "echo.safetensors", text, 4), "'w'")
    assert len(message) < 2000, f"message is {len(message)} characters"


def test_error_message_for_long_tensor_name_stays_bounded(tmp_path):
    name = "n" * 1_000_000
    message = refused(write_json(tmp_path / "name.safetensors", {name: entry("F33", (1,), (0, 4))}, 4), "nnnnnnnnnn")
    assert len(message) < 400  # names the tensor by its start and length, on one readable line
    assert "1000000 characters" in message


# ------------------------------------------------------------------------------------------ byte copies


def make_pair(tmp_path, size=100_003):
    src = tmp_path / "src.bin"
    dst = tmp_path / "dst.bin"
    payload = os.urandom(size)
    src.write_bytes(payload)
    dst.write_bytes(b"\xee" * (size + 64))
    return src, dst, payload


def do_copy(src, dst, src_offset, dst_offset, length, scratch_size):
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR)
    try:
        copy_range(s, d, src_offset, dst_offset, length, scratch_size or 8 << 20)
    finally:
        os.close(s)
        os.close(d)
    return dst.read_bytes()


def expected_after_copy(payload, size, src_offset, dst_offset, length):
    out = bytearray(b"\xee" * (size + 64))
    out[dst_offset : dst_offset + length] = payload[src_offset : src_offset + length]
    return bytes(out)


@pytest.mark.parametrize(
    "src_offset,dst_offset,length", [(0, 0, 100_003), (13, 50, 70_001), (99_000, 7, 1003), (5, 5, 0)]
)
def test_copy_range_copies_exactly_in_kernel_path(tmp_path, src_offset, dst_offset, length):
    src, dst, payload = make_pair(tmp_path)
    got = do_copy(src, dst, src_offset, dst_offset, length, None)
    assert got == expected_after_copy(payload, len(payload), src_offset, dst_offset, length)


def _exdev(*args, **kwargs):
    raise OSError(errno.EXDEV, "Invalid cross-device link")


@pytest.mark.parametrize("scratch_size", [None, 1, 7, 4096, 1 << 20])
def test_copy_range_fallback_through_scratch_copies_exactly(tmp_path, monkeypatch, scratch_size):
    monkeypatch.setattr(os, "copy_file_range", _exdev, raising=False)
    src, dst, payload = make_pair(tmp_path, size=20_011)
    got = do_copy(src, dst, 17, 33, 19_000, scratch_size)
    assert got == expected_after_copy(payload, len(payload), 17, 33, 19_000)


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_range_falls_back_on_each_unsupported_errno(tmp_path, monkeypatch, code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)
    src, dst, payload = make_pair(tmp_path, size=5000)
    got = do_copy(src, dst, 0, 10, 5000, 333)
    assert got == expected_after_copy(payload, len(payload), 0, 10, 5000)


def test_copy_range_fallback_resumes_after_partial_kernel_copy(tmp_path, monkeypatch):
    real = os.copy_file_range
    calls = []

    def partial_then_exdev(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) == 1:
            return real(src_fd, dst_fd, min(count, 1234), offset_src, offset_dst)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", partial_then_exdev)
    src, dst, payload = make_pair(tmp_path, size=10_000)
    got = do_copy(src, dst, 100, 200, 9_000, 512)
    assert got == expected_after_copy(payload, len(payload), 100, 200, 9_000)
    assert len(calls) == 2


def test_copy_range_without_copy_file_range_attribute(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    src, dst, payload = make_pair(tmp_path, size=3000)
    got = do_copy(src, dst, 1, 2, 2999, None)
    assert got == expected_after_copy(payload, len(payload), 1, 2, 2999)


def test_copy_range_past_end_of_source_is_an_error(tmp_path):
    src, dst, payload = make_pair(tmp_path, size=1000)
    with pytest.raises(ShardmergeError):
        do_copy(src, dst, 900, 0, 200, None)


def test_copy_range_past_end_of_source_is_an_error_in_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", _exdev, raising=False)
    src, dst, payload = make_pair(tmp_path, size=1000)
    with pytest.raises(ShardmergeError):
        do_copy(src, dst, 900, 0, 200, 64)


def test_copy_range_propagates_unexpected_errors(tmp_path, monkeypatch):
    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", eio, raising=False)
    src, dst, _ = make_pair(tmp_path, size=100)
    with pytest.raises(OSError) as info:
        do_copy(src, dst, 0, 0, 100, None)
    assert info.value.errno == errno.EIO


# ----------------------------------------------------------------------------------- pread / pwrite


def test_pread_into_short_file_names_the_file(tmp_path):
    path = tmp_path / "shortread.bin"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ShardmergeError) as info:
            pread_into(fd, bytearray(8), 5, path)
    finally:
        os.close(fd)
    assert path.name in str(info.value)


def test_pread_into_fills_a_typed_buffer(tmp_path):
    path = tmp_path / "typed.bin"
    t = torch.arange(10, dtype=torch.float32)
    path.write_bytes(b"pad!" + tensor_bytes(t))
    out = torch.empty(10, dtype=torch.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_into(fd, out.numpy(), 4, path)
    finally:
        os.close(fd)
    assert torch.equal(out, t)


def test_pwrite_all_writes_at_offset(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"." * 20)
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_all(fd, b"hello", 7)
        pwrite_all(fd, memoryview(bytearray(b"XY")), 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"XY....." + b"hello" + b"." * 8


def test_dtype_table_matches_torch_element_sizes():
    for dtype, name in TORCH_TO_ST.items():
        assert sio.DTYPE_SIZES[name] == torch.empty((), dtype=dtype).element_size(), name


def test_copy_range_starts_block_aligned_ranges_on_their_own_call(tmp_path, monkeypatch):
    # Extent-sharing filesystems clone only from block-aligned offsets: the unaligned head goes first, alone.
    real, calls = os.copy_file_range, []

    def recording(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        calls.append((offset_src, offset_dst, count))
        return real(src_fd, dst_fd, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", recording)
    src, dst, payload = make_pair(tmp_path, size=20_000)
    got = do_copy(src, dst, 4096 + 100, 100, 15_000, None)
    assert got == expected_after_copy(payload, len(payload), 4196, 100, 15_000)
    assert calls[:2] == [(4196, 100, 3996), (8192, 4096, 11_004)]


def test_copy_range_with_offsets_that_cannot_align_is_one_call(tmp_path, monkeypatch):
    real, calls = os.copy_file_range, []
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    src, dst, payload = make_pair(tmp_path, size=20_000)
    assert do_copy(src, dst, 101, 100, 15_000, None) == expected_after_copy(payload, len(payload), 101, 100, 15_000)
    assert calls == [15_000]


def test_encode_header_like_a_longer_base_header_pads_to_its_data_start():
    entries = [("a", "F32", (2, 3), 24), ("b", "BF16", (5,), 10)]
    prefix, offsets = encode_header(entries, {"format": "pt"}, like=4096 + 8)
    assert len(prefix) == 4096 + 8 and offsets == [4104, 4128]
    json.loads(prefix[8:])  # trailing spaces keep it valid JSON


def test_encode_header_longer_than_like_keeps_its_offset_modulo_the_block():
    entries = [("x" * 300, "F32", (1,), 4)]
    prefix, _ = encode_header(entries, None, like=64)
    assert len(prefix) > 64 and (len(prefix) - 64) % sio.SHARE_BLOCK == 0


def test_encode_header_like_an_unaligned_base_pads_to_8_bytes_only():
    prefix, _ = encode_header([("a", "F32", (1,), 4)], None, like=4097)
    assert len(prefix) % 8 == 0 and len(prefix) <= 64


def test_padded_header_reads_back_with_the_reference_reader(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}
    entries = [
        (n, sio_dtype, tuple(t.shape), t.numel() * t.element_size())
        for (n, t), sio_dtype in zip(tensors.items(), ("F32", "BF16"))
    ]
    prefix, offsets = encode_header(entries, {"format": "pt"}, like=8192)
    path = tmp_path / "padded.safetensors"
    path.write_bytes(prefix + b"".join(t.view(torch.uint8).numpy().tobytes() for t in tensors.values()))
    with safe_open(str(path), "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
