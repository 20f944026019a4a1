"""remote_change after our own write: the server's clock at the write tells a later
rewrite (same ETag, another mode) from ours (issue 9, item 13)."""

from __future__ import annotations

import pytest

from sidecar.core.model import BaseEntry, RemoteObject
from sidecar.core.planner import Change, listing_seconds, needs_remote_hash, remote_change

WRITTEN_AT = listing_seconds("2026-12-03T09:22:07Z")
OURS = BaseEntry(3, "h", ("e",), written_at=WRITTEN_AT or 0)


@pytest.mark.parametrize(
    ("listed", "change"),
    [
        ("2026-12-03T09:22:07.900Z", Change.UNCHANGED),  # our write, ms resolution (rclone)
        ("2026-12-03T09:22:05.000Z", Change.UNCHANGED),  # AWS dates multipart by its start
        ("2026-12-03T09:22:08.000Z", Change.MODIFIED),  # a later second: someone else's
        ("", Change.UNCHANGED),
        ("not a date", Change.UNCHANGED),
    ],
)
def test_a_rewrite_after_our_own_write_is_seen(listed: str, change: Change) -> None:
    assert remote_change(RemoteObject("k", 3, "e", listed), OURS) is change


def test_a_known_last_modified_still_decides_as_text() -> None:
    known = BaseEntry(3, "h", ("e",), last_modified="2026-12-03T09:22:07.000Z", written_at=1)
    same = RemoteObject("k", 3, "e", "2026-12-03T09:22:07.000Z")
    assert remote_change(same, known) is Change.UNCHANGED
    later = RemoteObject("k", 3, "e", "2026-12-03T09:22:09.000Z")
    assert remote_change(later, known) is Change.MODIFIED


def test_listing_dates_in_other_spellings() -> None:
    assert listing_seconds("2026-12-03T09:22:07+00:00") == WRITTEN_AT
    assert listing_seconds("2026-12-03T09:22:07.123456Z") == WRITTEN_AT


def test_a_rewrite_of_a_file_deleted_here_is_asked_about_before_it_comes_back() -> None:
    later = RemoteObject("k", 3, "e", "2026-12-03T09:22:09.000Z")
    assert needs_remote_hash(None, later, OURS)  # a HEAD tells skew from a real rewrite
    assert not needs_remote_hash(None, RemoteObject("k", 3, "e", "2026-12-03T09:22:07Z"), OURS)
    assert not needs_remote_hash(None, RemoteObject("k", 4, "f", "2026-12-03T09:22:09Z"), OURS)
    # The HEAD showed our own hash and mode: clock skew, not a change.
    ours = RemoteObject("k", 3, "e", "2026-12-03T09:22:09.000Z", hash="h", executable=False)
    assert remote_change(ours, OURS) is Change.UNCHANGED
