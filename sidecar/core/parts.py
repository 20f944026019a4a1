"""Part arithmetic for multipart uploads and ranged downloads."""

from __future__ import annotations

MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 1024**2  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024**3


def part_size_for(file_size: int, preferred: int) -> int:
    """The part size to use: `preferred`, grown (doubling) so no object needs > 10,000 parts."""
    size = max(preferred, MIN_PART_SIZE)
    while size * MAX_PARTS < file_size and size < MAX_PART_SIZE:
        size *= 2
    return min(size, MAX_PART_SIZE)


def split_ranges(file_size: int, part_size: int) -> list[tuple[int, int]]:
    """[(offset, length), ...] covering file_size bytes; one empty range for an empty file."""
    if file_size == 0:
        return [(0, 0)]
    return [
        (offset, min(part_size, file_size - offset)) for offset in range(0, file_size, part_size)
    ]


def part_ranges(file_size: int, preferred: int) -> list[tuple[int, int]]:
    """The parts of one object, uploads and ranged downloads alike: `preferred` made valid
    for S3 and the size (part_size_for), then split."""
    return split_ranges(file_size, part_size_for(file_size, preferred))
