"""The state store's promises (sidecar/engine/state.py) that the round trip, migration and
memory tests (test_scale_memory.py) and the journal's durability tests
(e2e/test_journal_durability.py) leave open: a journal left by a killed run is replayed by
the next StateStore, whatever kind its records are, and only its whole records count; a
commit with nothing changed writes nothing; a state folder is one (remote, local folder)
pair's and never another's; the hash cache is what the last scan saw, no more.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

import sidecar.engine.state as state_module
from sidecar.core.model import UNHASHED, BaseEntry, HashCacheEntry, LocalFile
from sidecar.engine.inputs import CachedHashes
from sidecar.engine.state import StateStore, state_path_for

REMOTE = "s3://b/p/"
LOCAL = Path("/data")


def entry(size: int, tag: str = "a") -> BaseEntry:
    return BaseEntry(size, f"{size:032x}", (f"etag-{tag}",), size % 2 == 1, "", 0)


def cached(size: int) -> HashCacheEntry:
    return (size, 1_796_000_000_000_000_000 + size, 10**6 + size, f"{size:032x}")


def file_of(row: HashCacheEntry) -> LocalFile:
    """A scanned file with the identity of a cache row (hashed or not: the scan's doesn't
    say)."""
    return LocalFile(row[0], row[1], row[2], False, UNHASHED)


def scan_passes(state: StateStore, files: dict[str, LocalFile]) -> list[tuple[str, LocalFile]]:
    """The sync's scan going by (sidecar/engine/inputs.py): the cache applied to the files
    in key order and brought up to them (rows of other paths or identities dropped)."""
    cache = CachedHashes(state)
    seen = cache.apply(sorted(files.items()))
    cache.finish()
    return seen


def opened(directory: Path, remote: str = REMOTE, local: Path = LOCAL) -> StateStore:
    state = StateStore(directory, remote, local)
    state.load()
    return state


def killed(state: StateStore) -> None:
    """What kill -9 leaves: the journal's fd closed by the kernel, no commit."""
    state.close_journal()
    state._close_db()


def identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


# ---- the journal after a kill ------------------------------------------------------------
def test_every_kind_of_record_is_replayed_by_the_next_store(tmp_path: Path) -> None:
    """A run killed before its commit: the next load sees every change it recorded, on top of
    what state.db held, and its commit makes them state.db's and empties the journal."""
    first = opened(tmp_path)
    first.set_base("kept", entry(1))
    first.set_base("gone", entry(2))
    first.set_hash("kept", cached(1))
    first.set_hash("gone", cached(2))
    assert first.commit()
    first.set_base("new", entry(3))
    first.set_base("kept", entry(4, "b"))  # replaced
    first.drop_base("gone")
    first.set_hash("new", cached(3))
    first.write_sending("sent", 5, "5" * 32, True)
    killed(first)
    assert (tmp_path / "journal.jsonl").stat().st_size > 0

    second = opened(tmp_path)
    assert dict(second.base) == {"kept": entry(4, "b"), "new": entry(3)}
    assert dict(second.hash_cache) == {"kept": cached(1), "gone": cached(2), "new": cached(3)}
    assert second.sending == {"sent": (5, "5" * 32, True)}
    assert second.commit(), "replayed records are changes state.db does not hold yet"
    assert not (tmp_path / "journal.jsonl").exists()
    killed(second)

    third = opened(tmp_path)
    assert dict(third.base) == {"kept": entry(4, "b"), "new": entry(3)}
    assert third.sending == {"sent": (5, "5" * 32, True)}
    assert not third.commit(), "nothing was replayed, nothing changed"


async def test_open_multipart_uploads_are_recorded_and_forgotten(tmp_path: Path) -> None:
    """An upload's id survives a kill until upload_ended, then no run is told of it; a create
    whose id never came back is remembered until upload_create_ended, in the journal and in
    state.db alike."""
    state = opened(tmp_path)
    await state.upload_creating("big/a.bin")
    await state.upload_started("id-a", "big/a.bin")
    await state.upload_creating("big/b.bin")  # no id back: killed in CreateMultipartUpload
    await state.upload_creating("big/c.bin")
    await state.upload_started("id-c", "big/c.bin")
    killed(state)

    replayed = opened(tmp_path)
    assert replayed.open_uploads == {"id-a": "big/a.bin", "id-c": "big/c.bin"}
    assert replayed.creating == {"big/b.bin"}, "an id that came back ends its create"
    replayed.upload_ended("id-a")
    assert replayed.commit()
    killed(replayed)

    committed = opened(tmp_path)  # from state.db's header this time: no journal left
    assert not (tmp_path / "journal.jsonl").exists()
    assert committed.open_uploads == {"id-c": "big/c.bin"}
    assert committed.creating == {"big/b.bin"}
    committed.upload_ended("id-c")
    committed.upload_create_ended("big/b.bin")
    killed(committed)

    done = opened(tmp_path)
    assert done.open_uploads == {} and done.creating == set()


def test_a_journal_cut_anywhere_yields_exactly_its_whole_records(tmp_path: Path) -> None:
    """kill -9 mid-write may cut the last line at any byte: load applies every record before
    it and ignores the torn rest, wherever the cut falls (inside a string, a number, the
    list of ETags, right before the newline)."""
    state = opened(tmp_path / "whole")
    state.set_base("a", entry(1))
    state.set_base("b/é", entry(2))
    state.set_hash("a", cached(1))
    state.close_journal()
    prefix = (tmp_path / "whole" / "journal.jsonl").read_bytes()
    state.set_base("last", entry(123456, "torn"))
    state.close_journal()
    whole = (tmp_path / "whole" / "journal.jsonl").read_bytes()
    last_line = whole[len(prefix) :]
    assert last_line.endswith(b"\n")
    for cut in range(1, len(last_line)):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / "journal.jsonl").write_bytes(prefix + last_line[:cut])
        again = opened(directory)
        expected = {"a": entry(1), "b/é": entry(2)}
        if cut == len(last_line) - 1:  # the record is whole, only its newline is missing
            expected["last"] = entry(123456, "torn")
        assert dict(again.base) == expected, f"cut after {last_line[:cut]!r}"
        assert dict(again.hash_cache) == {"a": cached(1)}
        killed(again)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xfe\x00garbage\x80",  # bytes of another file a power cut left in the tail
        b"12345",  # JSON, but no record
        b'{"op": "set"}',
        b"[]",
        b'["set"]',  # a record too short for its kind
        b'["mpu", "id-only"]',
        b'["hash", "p", "not", "numbers"]',
    ],
)
def test_a_journal_line_that_is_no_record_is_skipped_not_fatal(
    tmp_path: Path, garbage: bytes
) -> None:
    """Whatever a crash or a bad disk leaves in the journal, load keeps every whole record
    around it and goes on: a load that raises fails every sync until someone deletes the
    file by hand."""
    state = opened(tmp_path)
    state.set_base("before", entry(1))
    state.close_journal()
    with open(tmp_path / "journal.jsonl", "ab") as journal:
        journal.write(garbage + b"\n" + b'["set","after",2,"%s",["e"],false,""]\n' % (b"0" * 32))
    again = opened(tmp_path)
    assert set(again.base) == {"before", "after"}
    assert again.open_uploads == {} and dict(again.hash_cache) == {}
    killed(again)


HASH = '"' + "0" * 32 + '"'  # a hash as a journal line holds it


@pytest.mark.parametrize(
    "record",
    [
        '["set","p","twelve",HASH,["e"],false,""]',  # a size that is a string
        '["set","p",true,HASH,["e"],false,""]',  # a size that is a boolean
        '["set","p",-1,HASH,["e"],false,""]',
        '["set","p",12,HASH,"e",false,""]',  # ETags that are no list
        '["set","p",12,HASH,["e"],false,7]',  # a Last-Modified that is a number
        '["set","p",12,HASH,["e"],false,"",1e+30]',  # written_at no integer
        '["set","p",12,HASH,["e"],false,"",1000000000000000000000000000000]',
        '["set",7,12,HASH,["e"],false,""]',  # a path that is a number
        '["set","\\ud800",12,HASH,["e"],false,""]',  # a path SQLite cannot store (UTF-8)
        '["hash","p",12,1,[3],HASH]',  # an inode that is a list
        '["hash","p",12,1,3,42]',  # a hash that is a number
        '["hash","p",12,1,36893488147419103232,HASH]',  # an inode past 64 bits
        '["hash","p",12,"1",3,HASH]',
        '["sending","p","12",HASH,false]',
        '["mpu-create",5]',
        '["mpu","id",5]',
        '["mpu",5,"key"]',
        '["del",7]',
    ],
)
def test_a_journal_record_with_fields_of_the_wrong_type_is_skipped_and_named(
    tmp_path: Path, record: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record of the right shape whose fields have the wrong types (a size that is a
    string, a hash that is a number) is skipped with a warning naming its line, like any
    line that is no record: it went into memory and failed the commit (a path SQLite cannot
    store, a number past 64 bits, a mixed list of keys), or reached the planner with a size it
    cannot compare. Nothing else of the journal is lost."""
    state = opened(tmp_path)
    state.set_base("before", entry(1))
    state.set_hash("before", cached(1))
    state.close_journal()
    with open(tmp_path / "journal.jsonl", "ab") as journal:
        journal.write(record.replace("HASH", HASH).encode() + b"\n")
        journal.write(b'["set","after",2,%s,["e"],false,""]\n' % HASH.encode())
    with caplog.at_level("WARNING", logger="sidecar.state"):
        again = opened(tmp_path)
    assert any("journal.jsonl line 3" in message for message in caplog.messages), caplog.text
    assert set(again.base) == {"before", "after"}
    assert dict(again.hash_cache) == {"before": cached(1)}
    assert again.open_uploads == {} and again.creating == set() and again.sending == {}
    assert again.commit()
    killed(again)
    committed = opened(tmp_path)
    assert set(committed.base) == {"before", "after"}
    assert dict(committed.hash_cache) == {"before": cached(1)}
    killed(committed)


def test_replaying_records_state_db_holds_already_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At FLUSH_AT records the store writes them into state.db and empties the journal; a kill
    between the two leaves a journal of records state.db holds, and replaying it (sets and
    removals both) gives the same state."""
    monkeypatch.setattr(state_module, "FLUSH_AT", 6)
    state = opened(tmp_path)
    state.set_base("old", entry(9))
    assert state.commit()
    journal = tmp_path / "journal.jsonl"
    lines: list[bytes] = []
    for index in range(5):
        state.set_base(f"f{index}", entry(index))
        lines = journal.read_bytes().splitlines(keepends=True)
    state.drop_base("old")
    assert journal.stat().st_size == 0, "the sixth record flushed all six into state.db"
    lines.append(b'["del","old"]\n')
    expected = {f"f{index}": entry(index) for index in range(5)}
    assert dict(opened(tmp_path).base) == expected
    killed(state)

    journal.write_bytes(b"".join(lines))  # killed after the commit, before the truncation
    again = opened(tmp_path)
    assert dict(again.base) == expected
    assert len(again.base) == len(expected), "a replayed set must not count a row twice"
    killed(again)


# ---- nothing changed, nothing written ------------------------------------------------------
def test_a_commit_with_nothing_changed_writes_nothing(tmp_path: Path) -> None:
    """Re-recording what BASE and the cache hold, dropping what is not there, and a scan that
    saw what the cache holds are no changes: no journal line, and commit touches no file."""
    state = opened(tmp_path)
    state.set_base("a", entry(1))
    state.set_hash("a", cached(1))
    state.set_hash("b", cached(2))
    assert state.commit()
    state.remember_disk()  # as the engine does after its commit, under the state lock
    db = tmp_path / "state.db"
    before = identity(db)
    written = "SELECT value FROM meta WHERE key = 'written'"
    header = sqlite3.connect(db).execute(written).fetchall()

    state.set_hash("a", cached(1))
    state.drop_base("never-there")
    state.write_settled("never-sent")
    state.upload_create_ended("never-created")
    scanned = scan_passes(state, {"b": file_of(cached(2)), "a": file_of(cached(1))})
    assert [(path, found.hash) for path, found in scanned] == [
        ("a", cached(1)[3]),
        ("b", cached(2)[3]),
    ], "the cached hashes serve the unchanged files"
    assert not (tmp_path / "journal.jsonl").exists()
    assert not state.commit()
    assert identity(db) == before
    assert sqlite3.connect(db).execute(written).fetchall() == header
    assert not state.changed_on_disk()
    killed(state)


def test_another_process_writing_the_state_is_noticed(tmp_path: Path) -> None:
    """A --once beside the daemon: what the daemon loaded is stale once the other one records
    or commits, and remember_disk() takes the new look as its own."""
    daemon = opened(tmp_path)
    daemon.set_base("a", entry(1))
    assert daemon.commit()
    daemon.remember_disk()
    assert not daemon.changed_on_disk()
    once = opened(tmp_path)
    once.set_base("b", entry(2))
    once.close_journal()
    assert daemon.changed_on_disk(), "a journal record of another process"
    assert once.commit()
    daemon.remember_disk()
    once.set_base("c", entry(3))
    assert once.commit()
    assert daemon.changed_on_disk(), "a commit of another process"
    killed(daemon)
    killed(once)


# ---- one state folder per pair -------------------------------------------------------------
def test_a_state_folder_is_one_pairs_and_never_reused_for_another(tmp_path: Path) -> None:
    """Another pair's BASE would read as 'everything deleted': state_path_for gives each
    (remote, folder, shard) its own folder, and a state.db found under another pair's name is
    set aside whole, never read as this pair's BASE."""
    folders = {
        state_path_for(tmp_path, REMOTE, LOCAL),
        state_path_for(tmp_path, "s3://b/other/", LOCAL),
        state_path_for(tmp_path, "s3://c/p/", LOCAL),
        state_path_for(tmp_path, REMOTE, Path("/elsewhere")),
        state_path_for(tmp_path, REMOTE, LOCAL, shard="0/2"),
        state_path_for(tmp_path, REMOTE, LOCAL, shard="1/2"),
    }
    assert len(folders) == 6
    assert state_path_for(tmp_path, REMOTE, LOCAL) in folders  # the same pair, the same one

    directory = tmp_path / "moved"
    original = opened(directory)
    original.set_base("a", entry(1))
    original.set_hash("a", cached(1))
    assert original.commit()
    killed(original)
    for remote, local in (("s3://b/other/", LOCAL), (REMOTE, Path("/elsewhere"))):
        reused = opened(directory, remote, local)
        assert dict(reused.base) == {} and dict(reused.hash_cache) == {}, (remote, local)
        assert not (directory / "state.db").exists()
        aside = list(directory.glob("state.damaged-*.db"))
        assert len(aside) == 1, (remote, local)
        # Set aside, not deleted: the first pair's BASE is still there to be looked at.
        rows = sqlite3.connect(aside[0]).execute("SELECT path FROM entries").fetchall()
        assert rows == [("a",)]
        aside[0].unlink()
        killed(reused)
        (directory / "state.db").unlink(missing_ok=True)
        again = opened(directory)  # rebuilt for the first pair for the next round
        again.set_base("a", entry(1))
        assert again.commit()
        killed(again)


def test_a_state_db_killed_before_its_first_transaction_reads_as_new(tmp_path: Path) -> None:
    """A state.db with no tables (the create was killed) holds nothing: read as new, not as
    damaged, and the next commit makes a whole one."""
    (tmp_path / "state.db").write_bytes(b"")
    state = opened(tmp_path)
    assert dict(state.base) == {} and not list(tmp_path.glob("state.damaged-*"))
    state.set_base("a", entry(1))
    assert state.commit()
    killed(state)
    assert dict(opened(tmp_path).base) == {"a": entry(1)}


# ---- the hash cache is the last scan's -----------------------------------------------------
def test_cache_entries_of_vanished_paths_are_dropped_and_base_kept(tmp_path: Path) -> None:
    """After a scan the cache is exactly what it saw: a vanished path's entry goes (its BASE
    row stays: the sync decides about it), an unchanged one stays, a changed one and a new
    one come as the sync hashes them (note_hash, as StreamedWalk._hash_held does)."""
    state = opened(tmp_path)
    for index in range(4):
        state.set_base(f"f{index}", entry(index))
        state.set_hash(f"f{index}", cached(index))
    state.set_hash("cache-only", cached(9))
    assert state.commit()

    seen = {"f1": cached(1), "f3": cached(33), "new": cached(5)}
    scan_passes(state, {path: file_of(row) for path, row in seen.items()})
    state.note_hash("f3", cached(33))
    state.note_hash("new", cached(5))
    assert dict(state.hash_cache) == seen, "lookups see the scan's cache before the commit"
    assert len(state.hash_cache) == 3
    assert state.commit()
    killed(state)

    again = opened(tmp_path)
    assert dict(again.hash_cache) == seen
    assert set(again.base) == {"f0", "f1", "f2", "f3"}
    rows = sqlite3.connect(tmp_path / "state.db").execute("SELECT path FROM entries").fetchall()
    assert sorted(rows) == [("f0",), ("f1",), ("f2",), ("f3",), ("new",)], (
        "a path in neither half leaves no row behind"
    )
    again.set_hash("f1", cached(1))
    assert not (tmp_path / "journal.jsonl").exists(), "an unchanged entry is no record"
    killed(again)


def test_after_a_scan_replaced_the_cache_a_row_it_left_out_is_gone_from_lookups(
    tmp_path: Path,
) -> None:
    """A lookup reads a window of rows, then the scan passing drops rows (f0 rewritten, f2
    and f3 vanished). The window read before must not answer for them: when it said a
    dropped row was still there, the transfer's drop_hash recorded a removal that took one
    from the count; a few such syncs in one daemon and len() went negative, which failed
    every later sync until a restart (found when the scan replaced the whole cache)."""
    state = opened(tmp_path)
    for index in range(4):
        state.set_hash(f"f{index}", cached(index))
    assert state.commit()
    again = opened(tmp_path)
    assert again.hash_cache.get("f0") == cached(0)  # the scan's lookup reads a window
    scan_passes(again, {"f0": file_of(cached(100)), "f1": file_of(cached(1))})
    assert "f0" not in again.hash_cache and again.hash_cache.get("f0") is None
    again.drop_hash("f0")  # a transfer's racy file (f0 as rewritten): nothing to drop
    assert len(again.hash_cache) == 1 and dict(again.hash_cache) == {"f1": cached(1)}
    assert again.commit()
    assert len(again.hash_cache) == 1
    killed(again)
    assert dict(opened(tmp_path).hash_cache) == {"f1": cached(1)}
