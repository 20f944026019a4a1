"""What BASE records (sidecar/core/agreement.py) as tables: the entry each action leaves,
what a listing teaches about an unchanged object, and which files the hash cache keeps."""

from __future__ import annotations

import pytest

from sidecar.core.agreement import (
    ETAGS_KEPT,
    RACY_MARGIN_NS,
    agreed,
    base_after,
    cache_entry,
    cacheable,
    learned,
    racy,
    written,
)
from sidecar.core.model import UNHASHED, Action, ActionKind, BaseEntry, LocalFile, RemoteObject

K = ActionKind
LM = "2026-12-03T09:22:07.000Z"
LM2 = "2026-12-03T09:30:00.000Z"
OURS_LM = "2025-12-03T09:22:07.500Z"  # in the second of BASE_OURS's write
B = BaseEntry


def lf(digest: str = "h", size: int = 3, executable: bool = False) -> LocalFile:
    return LocalFile(size=size, mtime_ns=7, inode=9, executable=executable, hash=digest)


def ro(
    etag: str = "e",
    size: int = 3,
    last_modified: str = LM,
    digest: str | None = None,
    executable: bool | None = None,
) -> RemoteObject:
    return RemoteObject("p/f", size, etag, last_modified, digest, executable)


# ---- the entry an action leaves ---------------------------------------------------------

# (kind, planned local, remote, local after, etags answered, written_at) -> entry
AFTER = [
    # ADOPT: both sides equal already; the bucket's mode, the listed ETag and LastModified
    (K.ADOPT, lf(), ro(executable=True), None, (), 0, B(3, "h", ("e",), True, LM)),
    (K.ADOPT, lf(executable=True), ro(), None, (), 0, B(3, "h", ("e",), False, LM)),
    (K.ADOPT, lf(), ro(executable=None), None, (), 0, B(3, "h", ("e",), False, LM)),
    # SET_MODE_LOCAL: the chmod gave the file the bucket's mode
    (K.SET_MODE_LOCAL, lf(), ro(executable=True), None, (), 0, B(3, "h", ("e",), True, LM)),
    (K.SET_MODE_LOCAL, lf(executable=True), ro(executable=False), None, (), 0,
     B(3, "h", ("e",), False, LM)),
    # DOWNLOAD: the file as placed (its mode from the object's metadata), the ETag it was
    # read at, the listed LastModified
    (K.DOWNLOAD, None, ro(size=5), lf("h2", 5, True), ("e",), 0, B(5, "h2", ("e",), True, LM)),
    (K.DOWNLOAD, lf(), ro(size=5), lf("h2", 5), ("e",), 0, B(5, "h2", ("e",), False, LM)),
    (K.DOWNLOAD, None, ro(last_modified=""), lf(), (), 0, B(3, "h", ("e",), False, "")),
    # UPLOAD / SET_MODE_REMOTE: our own write; LastModified unknown, the server's clock kept
    (K.UPLOAD, lf("h2", 5, True), None, None, ("w",), 1700, B(5, "h2", ("w",), True, "", 1700)),
    (K.UPLOAD, lf(), ro(), lf("h3", 4), ("w1", "w2"), 1700,
     B(4, "h3", ("w1", "w2"), False, "", 1700)),
    (K.UPLOAD, lf(), ro(), None, ("w",), 0, B(3, "h", ("w",), False, "", 0)),
    (K.SET_MODE_REMOTE, lf(executable=True), ro(), None, ("w",), 1800,
     B(3, "h", ("w",), True, "", 1800)),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "planned", "remote", "now", "etags", "at", "want"), AFTER)
def test_base_after(
    kind: ActionKind,
    planned: LocalFile | None,
    remote: RemoteObject | None,
    now: LocalFile | None,
    etags: tuple[str, ...],
    at: int,
    want: BaseEntry,
) -> None:
    action = Action(kind, "f", planned, remote)
    assert base_after(action, now, etags, at) == want


def test_every_kind_either_leaves_an_entry_or_refuses() -> None:
    leaves = {K.ADOPT, K.SET_MODE_LOCAL, K.DOWNLOAD, K.UPLOAD, K.SET_MODE_REMOTE}
    for kind in ActionKind:
        action = Action(kind, "f", lf(), ro())
        if kind in leaves:
            assert base_after(action, lf(), ("e",)).hash == "h"
        else:
            with pytest.raises(ValueError, match=r"f: a .* leaves no BASE entry"):
                base_after(action)


def test_agreed_and_written_are_the_two_shapes() -> None:
    assert agreed(3, "h", True, ro()) == BaseEntry(3, "h", ("e",), True, LM, 0)
    assert written(lf(), ("w",), 5) == BaseEntry(3, "h", ("w",), False, "", 5)


# ---- what a listing teaches -------------------------------------------------------------

BASE_LM = BaseEntry(3, "h", ("e",), False, LM)
BASE_OURS = BaseEntry(3, "h", ("w",), False, "", written_at=1764753727)  # 2025-12-03T09:22:07Z
BASE_FULL = BaseEntry(3, "h", ("e1", "e2", "e3", "e4"), False, LM)

# (entry, listed object) -> the new entry, or None (nothing to learn / not unchanged)
LEARN = [
    (None, ro(), None),  # no BASE: nothing to learn from
    (BASE_LM, ro(), None),  # the same ETag and LastModified: known already
    (BASE_LM, ro(last_modified=""), None),  # a listing without LastModified teaches nothing
    (BASE_LM, ro(last_modified=LM2), None),  # rewritten since (a mode change?): not unchanged
    (BASE_LM, ro(size=4), None),  # another size: modified
    (BASE_LM, ro("e2"), None),  # a new ETag, content unknown: modified, nothing learnt
    # a new ETag with the hash proven by a HEAD: the ETag and LastModified are learnt
    (BASE_LM, ro("e2", digest="h"), B(3, "h", ("e", "e2"), False, LM)),
    (BASE_LM, ro("e2", last_modified=LM2, digest="h"), B(3, "h", ("e", "e2"), False, LM2)),
    (BASE_LM, ro("e2", digest="h", executable=False), B(3, "h", ("e", "e2"), False, LM)),
    (BASE_LM, ro("e2", digest="h", executable=True), None),  # a mode change: modified
    (BASE_LM, ro("e2", digest="other"), None),  # other content
    # the proven hash, the same ETag, a new LastModified: only LastModified is learnt
    (BASE_LM, ro(last_modified=LM2, digest="h"), B(3, "h", ("e",), False, LM2)),
    # the oldest ETag goes once ETAGS_KEPT are kept
    (BASE_FULL, ro("e5", digest="h"), B(3, "h", ("e2", "e3", "e4", "e5"), False, LM)),
    (BASE_FULL, ro("e1"), None),  # a kept ETag, same LastModified: known
    # after our own write: the first listing's LastModified (not later than the write's
    # second) replaces the write's clock
    (BASE_OURS, ro("w", last_modified=OURS_LM), B(3, "h", ("w",), False, OURS_LM, 0)),
    (BASE_OURS, ro("w", last_modified="2025-12-03T09:22:08.000Z"), None),  # a later writer's
    # a listing without LastModified: a new ETag is learnt, the write's clock is kept
    (BASE_OURS, ro("w2", last_modified="", digest="h"),
     B(3, "h", ("w", "w2"), False, "", 1764753727)),
    (BASE_OURS, ro("w", last_modified=""), None),
]  # fmt: skip


@pytest.mark.parametrize(("entry", "obj", "want"), LEARN)
def test_learned(entry: BaseEntry | None, obj: RemoteObject, want: BaseEntry | None) -> None:
    assert learned(entry, obj) == want


def test_etags_kept_is_bounded_whatever_the_history() -> None:
    entry = BaseEntry(3, "h", ("e0",), False, LM)
    for n in range(1, 12):
        new = learned(entry, ro(f"e{n}", digest="h"))
        assert new is not None
        assert new.etags == tuple(f"e{i}" for i in range(max(0, n - ETAGS_KEPT + 1), n + 1))
        entry = new


def test_learned_is_none_unless_the_listing_teaches_something() -> None:
    assert learned(BASE_LM, ro("e2", digest="h")) == BaseEntry(3, "h", ("e", "e2"), False, LM)
    assert learned(BASE_LM, ro()) is None  # known
    assert learned(BASE_LM, ro("e2")) is None  # modified
    assert learned(None, ro()) is None  # no BASE


# ---- the hash cache's snapshot ----------------------------------------------------------


def test_cache_entry_is_identity_and_hash() -> None:
    assert cache_entry(lf("h", 3)) == (3, 7, 9, "h")


LATER = 7 + RACY_MARGIN_NS + 1  # a hashing clock at which mtime 7 is safely old
SECOND = 1_000_000_000
NOW = 1_700_000_000 * SECOND

# (mtime_ns, hashed_at_ns) -> racy: a write after the hash could keep this mtime, so the
# cached hash is not trusted (git's "racy clean")
RACY = [
    (NOW - 3600 * SECOND, NOW, False),  # an old tree: cached, a no-op hashes nothing
    (NOW - 2 * SECOND - 1, NOW, False),  # just past the margin
    (NOW - 2 * SECOND, NOW, True),  # on the margin: a FAT tick (2 s) could still match
    (NOW - SECOND, NOW, True),  # a 1 s tick (ext3, HFS+)
    (NOW - 4_000_000, NOW, True),  # a jiffy (Linux < 6.13)
    (NOW, NOW, True),  # written in the tick of the hash
    (NOW + 5 * SECOND, NOW, True),  # from the future (a skewed clock, a label): not trusted
    (0, 0, True),  # no clock known: nothing is trusted
]


@pytest.mark.parametrize(("mtime_ns", "hashed_at_ns", "want"), RACY)
def test_racy(mtime_ns: int, hashed_at_ns: int, want: bool) -> None:
    assert racy(mtime_ns, hashed_at_ns) is want


def test_cacheable_is_hashed_and_not_racy() -> None:
    assert cacheable(lf("h"), LATER)
    assert not cacheable(lf(UNHASHED), LATER)
    assert not cacheable(lf("h"), 7)  # hashed in the tick it was written
