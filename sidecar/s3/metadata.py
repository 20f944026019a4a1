"""The object-metadata format: what the sidecar stores with every object it writes
(x-amz-meta-*: content hash, mtime, mode), both directions, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# User-metadata names (x-amz-meta-*) we store with every object we write.
META_HASH = "xxh3-128"
META_MTIME = "mtime-ns"
META_MODE = "mode"
_PREFIX = "x-amz-meta-"


@dataclass(frozen=True, slots=True)
class Labels:
    """What an object's metadata says of its content; None where it says nothing (objects
    written by other tools, or by older versions)."""

    hash: str | None
    mtime_ns: int | None
    executable: bool


def labels_for(content_hash: str, mtime_ns: int, executable: bool) -> dict[str, str]:
    """The metadata (names without the x-amz-meta- prefix) for a file's content and stat."""
    return {
        META_HASH: content_hash,
        META_MTIME: str(mtime_ns),
        META_MODE: "755" if executable else "644",
    }


def read_labels(metadata: Mapping[str, str]) -> Labels:
    mtime = metadata.get(META_MTIME)
    return Labels(
        metadata.get(META_HASH) or None,
        int(mtime) if mtime and mtime.isdigit() else None,
        metadata.get(META_MODE) == "755",
    )


def to_headers(metadata: Mapping[str, str]) -> dict[str, str]:
    return {_PREFIX + name: value for name, value in metadata.items()}


def from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The user metadata of an answer's headers, names lower-case and without the prefix."""
    return {
        name[11:].lower(): value for name, value in headers.items() if name[:11].lower() == _PREFIX
    }
