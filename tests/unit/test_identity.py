"""A local file's identity (size, mtime_ns, inode) and mode, read from a stat once
(sidecar/core/model.py): the scan, the hash cache, the transfers' "changed since the scan?"
checks, the state files' fingerprint and the SSE-C key file all use it."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from sidecar.core.agreement import cache_entry
from sidecar.core.model import UNHASHED, LocalFile, identity_of


class FakeStat(NamedTuple):
    st_size: int
    st_mtime_ns: int
    st_ino: int
    st_mode: int = 0o100644


# (st_mode) -> executable: the owner's execute bit, nothing else
MODES = [
    (0o100644, False),
    (0o100755, True),
    (0o100700, True),
    (0o100744, True),
    (0o100100, True),
    (0o100654, False),  # group may execute, the owner may not
    (0o100645, False),  # others may execute, the owner may not
    (0o100600, False),
]


@pytest.mark.parametrize(("mode", "executable"), MODES)
def test_local_file_of_a_stat(mode: int, executable: bool) -> None:
    st = FakeStat(5, 1_700_000_000_123_456_789, 42, mode)
    local = LocalFile.of(st, "h")
    assert local == LocalFile(5, 1_700_000_000_123_456_789, 42, executable, "h")
    assert local.identity == identity_of(st) == (5, 1_700_000_000_123_456_789, 42)


# (stat then, stat now) -> same identity
CHANGES = [
    (FakeStat(5, 10, 1), FakeStat(5, 10, 1), True),
    (FakeStat(5, 10, 1), FakeStat(5, 10, 1, 0o100755), True),  # a chmod is no new content
    (FakeStat(5, 10, 1), FakeStat(6, 10, 1), False),  # grew
    (FakeStat(5, 10, 1), FakeStat(5, 11, 1), False),  # written again
    (FakeStat(5, 10, 1), FakeStat(5, 10, 2), False),  # replaced by another file (a rename)
]


@pytest.mark.parametrize(("then", "now", "same"), CHANGES)
def test_identity_tells_a_written_file(then: FakeStat, now: FakeStat, same: bool) -> None:
    assert (identity_of(then) == identity_of(now)) is same
    assert (LocalFile.of(then, UNHASHED).identity == identity_of(now)) is same


def test_the_hash_cache_row_is_identity_then_hash() -> None:
    local = LocalFile.of(FakeStat(5, 10, 1), "h")
    assert cache_entry(local) == (*local.identity, "h")
