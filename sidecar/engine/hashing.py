"""Content hashes: xxh3-128 for identity, MD5 only to compare with foreign single-part ETags."""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import xxhash

CHUNK = 1024 * 1024  # per hashing thread; larger buffers only add RSS


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_content_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def content_hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _hash_file(path: str | os.PathLike[str], hasher: Hasher) -> str:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            hasher.update(view[:count])
    return hasher.hexdigest()


def content_hash_file(path: str | os.PathLike[str]) -> str:
    """xxh3-128 hex of the file's bytes. Blocking: call from a worker thread."""
    return _hash_file(path, xxhash.xxh3_128())


def content_hash_fd(fd: int) -> str:
    """xxh3-128 hex of an open file's bytes, read with pread from offset 0 (the fd's own
    offset is left alone). Blocking: call from a worker thread."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    offset = 0
    while True:
        count = os.preadv(fd, [buffer], offset)
        if not count:
            break
        hasher.update(view[:count])
        offset += count
    return hasher.hexdigest()


def md5_file(path: str | os.PathLike[str]) -> str:
    return _hash_file(path, hashlib.md5(usedforsecurity=False))
