"""Sizes: how plans write them, how shardmerge prints them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardmerge.config import load_plan
from shardmerge.errors import PlanError
from shardmerge.units import GiB, KiB, MiB, TiB, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * GiB), ("2gib", 2 * GiB), ("2G", 2 * GiB), ("2g", 2 * GiB), ("512MiB", 512 * MiB), ("64K", 64 * KiB),
    ("1TiB", TiB), ("1T", TiB), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1kb", 1000), ("1TB", 10**12),
    ("1.5GiB", 3 * GiB // 2), (" 8 MiB ", 8 * MiB), ("4096", 4096), ("4096B", 4096),
])  # fmt: skip
def test_parse_size_units(text, expected):
    assert parse_size(text, "max_memory") == expected


def test_parse_size_takes_integers_as_bytes():
    assert parse_size(123, "max_memory") == 123


@pytest.mark.parametrize("value", ["", "GiB", "2 XB", "-1GiB", "1e9", "2GiBs", "two", True, False, None, [1], 0, "0MiB",
                                   "0.1B"])  # fmt: skip
def test_parse_size_refuses_non_sizes_naming_the_key(value):
    with pytest.raises(PlanError, match=r"^max_memory: "):
        parse_size(value, "max_memory")


@given(st.integers(min_value=1, max_value=2**50), st.sampled_from(["B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_parse_size_is_number_times_unit(number, unit):
    scale = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit]
    assert parse_size(f"{number}{unit}", "k") == number * scale


@pytest.mark.parametrize("n,text", [(0, "0B"), (1023, "1023B"), (KiB, "1.0KiB"), (1536, "1.5KiB"), (MiB, "1.0MiB"),
                                    (int(2.25 * GiB), "2.2GiB"), (3 * TiB, "3.0TiB")])  # fmt: skip
def test_format_size_uses_binary_units_with_one_decimal(n, text):
    assert format_size(n) == text


@given(st.integers(min_value=KiB, max_value=2**50))
def test_format_size_reads_back_within_its_rounding(n):
    # What is printed can be pasted into a plan: it parses back to within 5% (one decimal of the unit).
    assert abs(parse_size(format_size(n), "k") - n) <= 0.05 * n


def test_plan_sizes_and_their_keywords_parse_through_the_plan(tmp_path):
    plan = load_plan(
        {
            "base": str(tmp_path),
            "adapters": [str(tmp_path)],
            "output": str(tmp_path / "o"),
            "max_memory": "1.5GiB",
            "max_gpu_memory": "auto",
            "max_shard_size": "5GB",
        }
    )
    assert (plan.max_memory, plan.max_gpu_memory, plan.max_shard_size) == (3 * GiB // 2, "auto", 5 * 10**9)
    keep = load_plan(
        {
            "base": str(tmp_path),
            "adapters": [str(tmp_path)],
            "output": str(tmp_path / "o"),
            "max_gpu_memory": "8G",
            "max_shard_size": "keep",
        }
    )
    assert (keep.max_gpu_memory, keep.max_shard_size, keep.max_memory) == (8 * GiB, "keep", 2 * GiB)


def test_a_bad_size_override_names_its_flag(tmp_path):
    with pytest.raises(PlanError, match=r"^--max-memory: expected a size"):
        load_plan(
            {"base": str(tmp_path), "adapters": [str(tmp_path)], "output": str(tmp_path / "o")}, max_memory="lots"
        )
