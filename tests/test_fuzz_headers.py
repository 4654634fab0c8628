"""Property-based fuzzing of everything that parses bytes we did not write: safetensors headers and the index.

The property is the same throughout: a hostile or broken input either parses into something whose every claim
holds (each tensor inside the file, no two overlapping, shape and byte span agreeing, every shard inside the
model directory) or is refused with a ShardmergeError naming the file. Never another exception type, never a
long stall, never memory driven by the numbers in a header rather than by its size.

CI runs ~200 examples per test (profile "ci" in conftest.py). A long local run:
    SHARDMERGE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_headers.py --hypothesis-show-statistics
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import example, given, note
from hypothesis import strategies as st
from safetensors import safe_open

from shardmerge.errors import ShardmergeError
from shardmerge.safetensors_io import DTYPE_SIZES, ShardHeader, read_header
from shardmerge.sources import BaseModel, read_base

# Generous: a validator that is linear in the header does these in milliseconds.
MAX_SECONDS = 5.0
MAX_PEAK_BYTES = lambda file_size: (1 << 20) + 64 * file_size  # noqa: E731


# ------------------------------------------------------------------------------------------- the property


def check_read_header(path: Path) -> ShardHeader | None:
    """Run read_header under a clock and a memory tracer and check the property; the header or None if refused."""
    size = path.stat().st_size
    tracemalloc.start()
    started = time.monotonic()
    try:
        header = read_header(path)
        error = None
    except ShardmergeError as e:
        header, error = None, e
    finally:
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < MAX_SECONDS, f"read_header took {elapsed:.1f} s on a {size}-byte file"
    assert peak < MAX_PEAK_BYTES(size), f"read_header peaked at {peak} bytes on a {size}-byte file"
    if error is not None:
        message = str(error)
        assert path.name in message, message
        note(f"refused: {message[:300]}")
        return None
    check_header_consistent(header, path, size)
    return header


def check_header_consistent(header: ShardHeader, path: Path, size: int) -> None:
    assert header.file_size == size
    assert 8 <= header.data_start <= size
    spans = []
    for name, info in header.tensors.items():
        assert isinstance(name, str) and info.name == name
        assert info.dtype in DTYPE_SIZES
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info.shape)
        assert info.nbytes == math.prod(info.shape) * DTYPE_SIZES[info.dtype]
        assert header.data_start <= info.offset
        assert info.offset + info.nbytes <= size, f"{name} ends past the end of the file"
        if info.nbytes:
            spans.append((info.offset, info.offset + info.nbytes, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        assert begin_b >= end_a, f"{a} and {b} overlap"
    if header.metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


# ------------------------------------------------------------------------------- (a) arbitrary bytes


def length_prefixed(body: bytes, delta: int = 0) -> bytes:
    return struct.pack("<Q", max(0, len(body) + delta)) + body


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)

arbitrary_files = st.one_of(
    # anything at all
    st.binary(max_size=2048),
    # a header length that (nearly) fits the file, so the parser gets past the prefix
    st.builds(
        lambda body, delta, tail: length_prefixed(body, delta) + tail,
        st.binary(max_size=1024),
        st.integers(-9, 9),
        st.binary(max_size=128),
    ),
    # bytes that begin like a JSON object
    st.builds(
        lambda body, tail: length_prefixed(b"{" + body) + tail, st.binary(max_size=1024), st.binary(max_size=128)
    ),
    # any JSON document as the header
    st.builds(
        lambda value, tail: length_prefixed(json.dumps(value).encode()) + tail, json_values, st.binary(max_size=128)
    ),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@given(data=arbitrary_files)
@example(data=b"")
@example(data=struct.pack("<Q", 2**64 - 1))
@example(data=length_prefixed(b'{"a":{"dtype":[],"shape":[],"data_offsets":[0,0]}}'))
@example(data=length_prefixed(b'{"a":' + b"[" * 50_000))
def test_arbitrary_bytes_parse_or_are_refused(workdir, data):
    path = workdir / "arbitrary.safetensors"
    path.write_bytes(data)
    check_read_header(path)


# --------------------------------------------------------------------------- (b) plausible headers, mutated


class Raw:
    """A literal to splice into the JSON text as is (numbers json.dumps cannot or will not write)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:40]!r})"


def encode(value) -> str:
    """JSON text; a list of [key, value] pairs under `Pairs` keeps duplicate keys; Raw splices literals."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(json.dumps(k) + ":" + encode(v) for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + encode(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


class Pairs(list):
    """An object as ordered [key, value] pairs (duplicates allowed)."""


HUGE = [
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**65,
    10**20,
    10**300,
    10**1500,
    10**2500,
    -1,
    -2,
    -(2**63),
    Raw("1" * 5000),
    Raw("1e400"),
    Raw("-0"),
    Raw("1.0"),
    Raw("0.5"),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e3"),
    Raw("true"),
    Raw("null"),
    Raw('"8"'),
]
UNKNOWN_DTYPES = ["F33", "f32", "float32", "", "F4", "F6_E2M3", "I128", "BF16 ", "F32\x00", "🙂"]
KNOWN_DTYPES = sorted(DTYPE_SIZES)
junk = st.recursive(
    st.sampled_from(HUGE) | json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
tensor_names = st.one_of(
    st.sampled_from(["w", "model.layers.0.mlp.up_proj.weight", "__metadata__", "", " ", "a\nb", "\x00", "é"]),
    st.text(max_size=16),
)


def _slots(entry) -> list:
    """References (list, index) to the numbers of an entry that still has list-valued shape/data_offsets."""
    slots = []
    for key in ("data_offsets", "shape"):
        value = entry.get(key)
        if isinstance(value, list):
            slots += [(value, i) for i in range(len(value))]
    return slots


def _range(entry):
    offsets = entry.get("data_offsets")
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
        return offsets
    return None


@st.composite
def mutated_headers(draw):
    entries, cursor = Pairs(), 0
    for name in draw(st.lists(tensor_names, max_size=6)):
        dtype = draw(st.sampled_from(KNOWN_DTYPES) | st.sampled_from(UNKNOWN_DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
        nbytes = math.prod(shape) * DTYPE_SIZES.get(dtype, 4)
        begin = cursor + draw(st.sampled_from([0, 0, 0, 0, 1, 3, 8]))
        cursor = begin + nbytes
        entries.append([name, {"dtype": dtype, "shape": shape, "data_offsets": [begin, cursor]}])
    if entries and draw(st.booleans()):
        entries = Pairs(draw(st.permutations(entries)))

    for _ in range(draw(st.integers(0, 3)) if entries else 0):
        i = draw(st.integers(0, len(entries) - 1))
        name, e = entries[i]
        kind = draw(
            st.sampled_from(
                [
                    "off_by_one",
                    "overlap",
                    "huge",
                    "junk_field",
                    "junk_entry",
                    "drop_key",
                    "extra_key",
                    "duplicate",
                    "shape_dim",
                    "rename",
                    "empty_range",
                ]
            )
        )
        note(f"mutation {kind} on entry {i}")
        if not isinstance(e, dict):
            continue
        slots = _slots(e)
        if kind == "off_by_one" and slots:
            container, j = draw(st.sampled_from(slots))
            if isinstance(container[j], int):
                container[j] += draw(st.sampled_from([-1, 1]))
        elif kind == "overlap":
            other = entries[draw(st.integers(0, len(entries) - 1))][1]
            mine, theirs = _range(e), isinstance(other, dict) and _range(other)
            if mine and theirs:
                start = theirs[0] + draw(st.integers(0, 4))
                e["data_offsets"] = [start, start + mine[1] - mine[0]]
        elif kind == "huge" and slots:
            container, j = draw(st.sampled_from(slots))
            container[j] = draw(st.sampled_from(HUGE))
        elif kind == "junk_field":
            e[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(junk)
        elif kind == "junk_entry":
            entries[i] = [name, draw(junk)]
        elif kind == "drop_key":
            e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra_key":
            e[draw(st.text(max_size=6))] = draw(junk)
        elif kind == "duplicate":
            entries.insert(draw(st.integers(0, len(entries))), [name, dict(e)])
        elif kind == "shape_dim" and isinstance(e.get("shape"), list):
            e["shape"] = e["shape"] + [draw(st.sampled_from([0, 1, 2, 2**63, -1, True, 1.0, None, [1]]))]
        elif kind == "rename":
            entries[i] = [draw(st.sampled_from(["__metadata__", "dtype", entries[0][0]])), e]
        elif kind == "empty_range" and _range(e):
            e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][0]]

    metadata = draw(st.sampled_from(["absent", "good", "junk"]))
    if metadata == "good":
        entries.insert(draw(st.integers(0, len(entries))), ["__metadata__", {"format": "pt"}])
    elif metadata == "junk":
        entries.insert(draw(st.integers(0, len(entries))), ["__metadata__", draw(junk)])

    text = encode(entries).encode("utf-8") + draw(st.sampled_from([b"", b" ", b"       ", b"\n", b"\t "]))
    data_len = max(0, cursor + draw(st.sampled_from([0, 0, 0, 0, -1, 1, -8, 7, 1000])))
    length_delta = draw(st.sampled_from([0] * 12 + [-1, 1, 8, -len(text), 2**40, 2**63]))
    return struct.pack("<Q", max(0, min(2**64 - 1, len(text) + length_delta))) + text + b"\x5a" * data_len


def strict_only(data: bytes) -> bool:
    """Whether the header avoids what we refuse on purpose but the reference tolerates: a key repeated in any
    JSON object (the reference keeps one), and an entry with keys besides dtype/shape/data_offsets (the reference
    ignores them). Only such headers take part in the differential check."""
    (n,) = struct.unpack("<Q", data[:8])
    repeated = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        repeated.append(len(keys) != len(set(keys)))
        return dict(pairs)

    try:
        doc = json.loads(data[8 : 8 + n], object_pairs_hook=hook)
    except Exception:  # noqa: BLE001 - any parse failure means the reference refuses it
        return True
    if any(repeated):
        return False
    if isinstance(doc, dict):
        for name, value in doc.items():
            if name != "__metadata__" and isinstance(value, dict) and set(value) - {"dtype", "shape", "data_offsets"}:
                return False
    return True


def reference_accepts(path: Path) -> dict | None:
    """What the reference safetensors reader makes of the file: {name: (dtype, shape)}, or None if it refuses."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception:  # noqa: BLE001 - the reference raises several types; here we only want accept/refuse
        return None


@given(data=mutated_headers())
def test_mutated_headers_parse_or_are_refused(workdir, data):
    path = workdir / "mutated.safetensors"
    path.write_bytes(data)
    header = check_read_header(path)
    # Differential check: a file the reference reader accepts, with only dtypes we support and none of the
    # deliberate strictness of strict_only(), we accept too and see the same tensors.
    ref = reference_accepts(path) if strict_only(data) else None
    if ref is not None and all(dtype in DTYPE_SIZES for dtype, _ in ref.values()):
        assert header is not None, "the reference safetensors reader accepts this file but read_header refuses it"
        assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == ref


@given(data=mutated_headers())
def test_truncated_mutated_headers_parse_or_are_refused(workdir, data):
    # The same inputs, truncated at a random point: truncation must never let a tensor point past the end.
    path = workdir / "truncated.safetensors"
    cut = len(data) - min(len(data), 1 + (len(data) * 7919) % 97)
    path.write_bytes(data[:cut])
    check_read_header(path)


# ------------------------------------------------------------------------- (c) the index, read by read_base


def write_shard(path: Path, tensors: dict[str, int]) -> None:
    """A valid shard of U8 tensors of the given sizes, laid out back to back."""
    header, cursor = {}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [cursor, cursor + n]}
        cursor += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(cursor))


SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
SHARD_CONTENTS = {SHARD_1: {"a": 4, "b": 2}, SHARD_2: {"c": 8}}


def shard_names(outside: Path, inside: Path):
    return st.one_of(
        st.sampled_from(
            [
                SHARD_1,
                SHARD_2,
                f"./{SHARD_1}",
                f"sub/../{SHARD_1}",
                "..",
                f"../{outside.name}/x.safetensors",
                str(outside / "x.safetensors"),
                str(inside / SHARD_1),
                "/etc/passwd",
                "evil.safetensors",
                "loop.safetensors",
                "dir.safetensors",
                ".",
                "",
                "sub/",
                "a\x00b.safetensors",
                "x" * 300,
                "y/" * 300 + "z",
                "..\\x.safetensors",
                "C:\\x.safetensors",
                "~/x.safetensors",
                "model.safetensors.index.json",
                "config.json",
                "a\nb.safetensors",
                "%2e%2e/x",
                "\u202e.safetensors",
            ]
        ),
        st.text(max_size=20),
        junk,
    )


@st.composite
def index_documents(draw, outside: Path, inside: Path):
    form = draw(st.sampled_from(["index"] * 6 + ["junk_json", "bytes", "no_weight_map"]))
    if form == "bytes":
        return draw(st.binary(max_size=512))
    if form == "junk_json":
        return encode(draw(junk)).encode()
    weight_map = Pairs()
    for _ in range(draw(st.integers(0, 6))):
        tensor = draw(st.sampled_from(["a", "b", "c", "d", "x"]) | st.text(max_size=10))
        weight_map.append([tensor, draw(shard_names(outside, inside))])
    document = Pairs([["weight_map", weight_map]])
    if form == "no_weight_map":
        document = Pairs()
    if draw(st.booleans()):
        document.append(["metadata", draw(st.just({"total_size": 14}) | junk)])
    return encode(document).encode("utf-8")


@pytest.fixture(scope="module")
def outside_dir(tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    write_shard(outside / "x.safetensors", {"a": 4, "b": 2, "c": 8})
    return outside


def build_model_dir(d: Path, outside: Path) -> Path:
    """A fresh two-shard model dir at `d`, with a symlink out, a self-loop and a directory posing as shards."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, contents in SHARD_CONTENTS.items():
        write_shard(d / name, contents)
    os.symlink(outside / "x.safetensors", d / "evil.safetensors")
    os.symlink(d / "loop.safetensors", d / "loop.safetensors")
    (d / "dir.safetensors").mkdir()
    (d / "config.json").write_text("{}")
    return d


def check_read_base(d: Path, expect_index: dict | None) -> BaseModel | None:
    started = time.monotonic()
    try:
        base = read_base(str(d))
    except ShardmergeError as e:
        assert time.monotonic() - started < MAX_SECONDS
        assert d.name in str(e), str(e)
        note(f"refused: {str(e)[:300]}")
        return None
    assert time.monotonic() - started < MAX_SECONDS
    real = d.resolve()
    for shard in base.shards:
        assert shard.path.resolve().is_relative_to(real), f"read a shard outside the model dir: {shard.path}"
    for info in base.tensors.values():
        assert info.path.resolve().is_relative_to(real)
    if expect_index is not None:
        for tensor, shard in expect_index.items():
            assert tensor in base.tensors, f"index names {tensor!r} but it was not found"
            assert base.tensors[tensor].path.resolve() == (d / shard).resolve()
    return base


def parsed_weight_map(raw: bytes) -> dict | None:
    try:
        doc = json.loads(raw)
    except Exception:  # noqa: BLE001 - any parse failure: no weight map
        return None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    return wm if isinstance(wm, dict) else None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models") / "model"


@given(data=st.data())
def test_read_base_fuzzed_index_returns_or_refuses(outside_dir, model_dir, data):
    raw = data.draw(index_documents(outside_dir, model_dir), label="index")
    d = build_model_dir(model_dir, outside_dir)
    (d / "model.safetensors.index.json").write_bytes(raw)
    check_read_base(d, parsed_weight_map(raw))


@pytest.mark.parametrize("name", ["a\x00b.safetensors", "x" * 300, "y/" * 300 + "z"])
def test_read_base_odd_shard_name_is_refused_cleanly(tmp_path, outside_dir, name):
    # Deterministic versions of inputs the fuzzer above finds: names the OS itself rejects (NUL byte,
    # a component over NAME_MAX) must come back as ShardmergeError, not ValueError/OSError.
    d = build_model_dir(tmp_path / "model", outside_dir)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(ShardmergeError) as info:
        read_base(str(d))
    assert d.name in str(info.value)
