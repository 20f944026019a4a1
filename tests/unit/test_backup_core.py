"""The pure part of backups and undo (sidecar/core/backup.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.core.backup import (
    Entry,
    Step,
    StepKind,
    SyncRecord,
    Version,
    is_bookkeeping,
    is_sync_id,
    new_sync_id,
    parse_duration,
    parse_utc,
    read_record,
    restore_targets,
    sync_id_time,
    undo_steps,
    versions_at,
)
from sidecar.core.filters import PathFilter

V1 = Version(3, "h1", "e1", key="pre/.netvol/backup/S/a")
V2 = Version(4, "h2", "e2")


def record(sync_id: str, time: str, *entries: Entry) -> SyncRecord:
    return SyncRecord(
        sync_id, time, "finalize", "remote", "host", "s3://b/p/", "/d", "copy", list(entries)
    )


def test_sync_ids_sort_by_time_and_carry_it() -> None:
    moment = datetime(2026, 12, 3, 12, 0, 0, 250_000, tzinfo=UTC)
    ids = [new_sync_id(moment + timedelta(milliseconds=i)) for i in range(3)]
    assert ids == sorted(ids) and all(is_sync_id(i) for i in ids)
    assert sync_id_time(ids[0]) == moment
    assert not is_sync_id("../../etc") and sync_id_time("nonsense") is None


def test_durations_times_and_bookkeeping_names() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("a week")
    assert parse_utc("2026-12-03T12:00") == datetime(2026, 12, 3, 12, tzinfo=UTC)
    assert parse_utc("2026-12-03T13:00+01:00") == datetime(2026, 12, 3, 12, tzinfo=UTC)
    assert is_bookkeeping(".netvol/history/x.json") and not is_bookkeeping("a/.netvol/x")
    files = PathFilter()
    assert not files.wants(".netvol/backup/S/a") and files.wants("a/.netvol/x")
    assert not files.wants_dir(".netvol")


def test_record_round_trips_and_counts() -> None:
    made = record(
        "20261203T120000000Z-abcdef",
        "2026-12-03T12:00:00Z",
        Entry("a", V1, V2),
        Entry("b", V1, None),
        Entry("c", None, V2),
    )
    again = SyncRecord.from_json(made.to_json())
    assert again == made
    assert (again.uploaded, again.replaced, again.deleted, again.bytes) == (1, 1, 1, 8)
    with pytest.raises(ValueError, match="unreadable history record"):
        SyncRecord.from_json(b"{}")


def _format_1(made: SyncRecord) -> bytes:
    """A record as format 1 wrote it (main before 2026-12-03 21:00 UTC): one JSON line."""
    data = {
        "format": 1,
        **made.summary(),
        "remote": made.remote,
        "local_dir": made.local_dir,
        "entries": [e.as_dict() for e in made.entries],
    }
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


ENTRIES = (
    Entry("a", V1, V2),
    Entry("b", V1, None),
    Entry("c", None, V2),
    Entry('d/"quoted",\n é', None, Version(1, executable=True, local="S/d")),
)


def test_a_record_is_a_line_per_entry_and_still_one_json_object() -> None:
    """Format 2: the header (summary and count) on the first line, an entry a line, a
    closing line; the whole is the JSON object format 1 was (an older reader parses it)."""
    made = record("20261203T120000000Z-abcdef", "2026-12-03T12:00:00Z", *ENTRIES)
    made.undoes = "20261203T110000000Z-000000"
    data = made.to_json()
    lines = data.splitlines(keepends=True)
    assert len(lines) == len(ENTRIES) + 2 and lines[-1] == b"]}\n"
    old_reader = json.loads(data)
    assert old_reader["entries"] == [e.as_dict() for e in ENTRIES]
    assert old_reader["count"] == 4 and old_reader["uploaded"] == 2
    header, entries = read_record(iter(lines))
    assert (header.sync_id, header.undoes, header.entries) == (made.sync_id, made.undoes, [])
    assert header.summary() == made.summary()  # known from the first line alone
    assert list(entries) == list(ENTRIES)
    assert SyncRecord.from_json(data) == made


def test_format_1_records_still_read() -> None:
    made = record("20261203T120000000Z-abcdef", "2026-12-03T12:00:00Z", *ENTRIES)
    old = _format_1(made)
    assert len(old.splitlines()) == 1
    again = SyncRecord.from_json(old)
    assert again == made
    header, entries = read_record(iter(old.splitlines(keepends=True)))
    assert header.summary() == made.summary() and list(entries) == list(ENTRIES)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:-1], "partial history record: it ends after 4 of its 4"),
        (lambda lines: lines[:3], "partial history record: it ends after 2 of its 4"),
        (lambda lines: [*lines[:3], lines[3][:10]], "line 4"),
        (lambda lines: [lines[0], *lines[2:]], "line 2"),  # the first entry lost: a comma
        (lambda lines: [*lines[:2], *lines[3:]], "3 entries where its header says 4"),
        (lambda lines: [lines[0][:30]], "unreadable history record"),
        (lambda lines: [], "unreadable history record"),
    ],
)
def test_a_cut_or_damaged_record_is_named_never_read_as_a_shorter_one(
    damage: Callable[[list[bytes]], list[bytes]], message: str
) -> None:
    made = record("20261203T120000000Z-abcdef", "2026-12-03T12:00:00Z", *ENTRIES)
    lines = damage(made.to_json().splitlines(keepends=True))
    with pytest.raises(ValueError, match=message):
        _header, entries = read_record(iter(lines))
        list(entries)
    with pytest.raises(ValueError, match=message):
        SyncRecord.from_json(b"".join(lines))


def test_an_undo_step_round_trips_as_a_line() -> None:
    for step in (
        Step(StepKind.PUT_BACK, "a/é", V1, V2),
        Step(StepKind.REMOVE, "b", None, Version(0, executable=True)),
    ):
        assert Step.from_line(step.to_line()) == step


def test_undo_steps_skip_paths_changed_since_unless_forced() -> None:
    made = record("S", "t", Entry("a", V1, V2), Entry("b", V1, None), Entry("c", None, V2))
    now = {"a": Version(4, "other", "e9"), "b": None, "c": V2}
    steps, skipped = undo_steps(made, now, force=False)
    assert [(s.kind, s.path) for s in steps] == [(StepKind.PUT_BACK, "b"), (StepKind.REMOVE, "c")]
    assert [s.path for s in skipped] == ["a"] and "changed since sync S" in skipped[0].reason
    forced, none_skipped = undo_steps(made, now, force=True)
    assert [s.path for s in forced] == ["a", "b", "c"] and not none_skipped
    unkept = record("S", "t", Entry("a", Version(3, "h1", "e1"), V2))
    steps, skipped = undo_steps(unkept, {"a": V2}, force=False)
    assert not steps and "was not kept" in skipped[0].reason


def test_restore_takes_the_before_of_the_first_sync_after_the_time() -> None:
    early = record("S1", "2026-12-03T11:00:00Z", Entry("d/x", None, V1))
    first = record("S2", "2026-12-03T12:30:00Z", Entry("d/x", V1, V2), Entry("d/new", None, V2))
    later = record("S3", "2026-12-03T13:00:00Z", Entry("d/x", V2, None), Entry("e", V1, V2))
    at = datetime(2026, 12, 3, 12, tzinfo=UTC)
    assert restore_targets([later, early, first], "d", at) == {"d/x": V1, "d/new": None}
    assert set(restore_targets([later, first], "", at)) == {"d/x", "d/new", "e"}


def test_versions_at_picks_the_newest_version_at_or_before_the_time() -> None:
    listed = [
        ("a", "v1", "2026-12-03T11:00:00.000Z", "e1", 1, False),
        ("a", "v2", "2026-12-03T13:00:00.000Z", "e2", 2, False),
        ("b", "v3", "2026-12-03T11:00:00Z", "e3", 3, False),
        ("b", "m1", "2026-12-03T11:30:00Z", "", 0, True),
        ("c", "v4", "2026-12-03T13:00:00Z", "e4", 4, False),
    ]
    found = versions_at(listed, datetime(2026, 12, 3, 12, tzinfo=UTC))
    assert found == {"a": Version(1, etag="e1", version_id="v1"), "b": None, "c": None}
