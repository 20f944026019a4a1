from __future__ import annotations

import pytest

from sidecar.core.parts import (
    MAX_PARTS,
    MIN_PART_SIZE,
    part_ranges,
    part_size_for,
    range_size_for,
    split_ranges,
)
from sidecar.core.units import format_bytes, format_duration, parse_size

MiB, GiB, TiB = 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize("size", [0, 1, 16 * MiB, 100 * GiB, 160 * GiB, 1 * TiB, 5 * TiB])
def test_part_size_never_needs_more_than_10000_parts(size: int) -> None:
    part = part_size_for(size, 16 * MiB)
    assert part >= 16 * MiB
    assert len(split_ranges(size, part)) <= MAX_PARTS


def test_part_size_respects_s3_minimum_and_grows_by_doubling() -> None:
    assert part_size_for(10, 1) == MIN_PART_SIZE
    assert part_size_for(200 * GiB, 16 * MiB) == 32 * MiB


def test_part_ranges_are_valid_s3_parts_whatever_the_preference() -> None:
    assert part_ranges(12 * MiB, 1 * MiB) == [(0, 5 * MiB), (5 * MiB, 5 * MiB), (10 * MiB, 2 * MiB)]
    assert len(part_ranges(200 * GiB, 16 * MiB)) <= MAX_PARTS
    assert part_ranges(0, 16 * MiB) == [(0, 0)]


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 24, 25])
def test_ranges_cover_every_byte_once(size: int) -> None:
    ranges = split_ranges(size, 8)
    covered = [i for offset, length in ranges for i in range(offset, offset + length)]
    assert covered == list(range(size))
    assert all(0 < length <= 8 for _, length in ranges) or size == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [("8MiB", 8 * MiB), ("64MB", 64_000_000), ("1GiB", GiB), ("1048576", MiB), ("1.5KiB", 1536)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "8 parsecs", "-1MiB", "1e3"])
def test_parse_size_rejects_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_formatting() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(25 * GiB) == "25.0 GiB"
    assert format_duration(5) == "5.0s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 60) == "3h01m"


@pytest.mark.parametrize(
    ("part_size", "memory", "round_trip", "expected"),
    [
        (16 * MiB, 64 * MiB, None, 16 * MiB),  # nothing measured yet: as configured
        (16 * MiB, 64 * MiB, 0.0002, 16 * MiB),  # loopback: fewer, larger requests
        (16 * MiB, 64 * MiB, 0.02, 5 * MiB),  # 20 ms: 12 streams in the same memory
        (16 * MiB, 64 * MiB, 0.08, 5 * MiB),
        (16 * MiB, 128 * MiB, 0.08, 8 * MiB),  # 16 streams when the memory allows
        (16 * MiB, 256 * MiB, 0.08, 16 * MiB),  # never above --part-size
        (16 * MiB, 32 * MiB, 0.08, 5 * MiB),  # never below S3's part minimum
    ],
)
def test_range_size_follows_the_round_trip(
    part_size: int, memory: int, round_trip: float | None, expected: int
) -> None:
    assert range_size_for(part_size, memory, round_trip) == expected
