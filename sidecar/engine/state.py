"""The state store: BASE, the local hash cache and open multipart uploads, kept outside the
synced folder.

BASE and the hash cache live on disk in state.db, an SQLite database (standard library): one
table keyed by path, WITHOUT ROWID, so its rows come in S3 key order (SQLite compares TEXT
as UTF-8 bytes, as S3 orders keys). `StateStore.base` and `.hash_cache` are read-only
mappings over it that read a window of rows at a time and hold only the changes not yet
written: memory does not grow with the number of files (at 1 M files BASE and the hash cache
as parsed dicts held ~720 MiB).

Crash safety: state.db changes only in SQLite transactions (rollback journal,
synchronous=FULL), so kill -9 or a power cut between two writes leaves the old or the new
content, never a mix. Between transactions every completed transfer is appended to
journal.jsonl, so an interrupted sync resumes without re-sending what it finished; a torn last
line is ignored on load, as is any line that is no record (bytes a power cut left in the
file's tail) or a record whose fields have the wrong types (journal_records.check_record): a
journal never makes load, nor the commit after it, fail. When FLUSH_AT records are held in
memory they go into state.db in one transaction and the journal is emptied: every record sets
or removes a value, so replaying a journal whose records state.db holds already changes
nothing, and a kill between the commit and the truncation is harmless.

Every journal record is handed to the OS by its own write(2) as it is made: the page cache
survives the process being killed (kill -9, OOM), the failure resume is for, so no record is
ever waiting in a buffer for a later one to push it out. Measured on 5,000 records (ext4 and
tmpfs alike): ~9.4 ms with one write per record against ~7.6 ms buffered with a 100 ms flush
timer, ~0.4 us a record, far below the request each record stands for; and no timer to outlive
the journal. A multipart upload's record is also fsynced before its first part is sent: an
upload id lost in a node crash is an upload billed forever that no run can abort.

A state folder of an older version (state.json, a line per path) is migrated into state.db
on first open, a batch of rows at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, ItemsView, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

from sidecar.core.model import BaseEntry, HashCacheEntry, identity_of
from sidecar.engine.journal_records import check_record

log = logging.getLogger("sidecar.state")  # logger name kept from before the move

FORMAT_VERSION = 3  # 1: one JSON object, 2: a line per path (both migrated); 3: state.db
# Hash-cache rows written before the racy-clean rule (core.agreement.racy, 86a7a9f) are still
# trusted, and no version bump forgets them, because no cheap rule tells the racy ones apart.
# A row is racy when it was hashed less than RACY_MARGIN_NS after the file's mtime, and a row
# holds (size, mtime_ns, inode, hash), no time of hashing. The one time state.db keeps, meta
# "written", is the last commit's: an upper bound on when each row was hashed, where the rule
# needs a lower one. The state folder's birth time would be one, but Python 3.11 does not
# expose it on Linux (statx) and a copied or restored folder loses it. The one correct rule
# left is to forget every row once, which makes the first sync after the upgrade read every
# byte of the tree again (walk.py hashes every uncached file that BASE or the bucket has:
# hours on a TB volume, with readiness waiting on the initial pull). What it would catch
# needs a same-size rewrite within one timestamp tick of an old version's hash (a jiffy on
# ext4/xfs before Linux 6.13) of a file never touched again since. To forget the cache by
# hand while no sync runs: sqlite3 state.db "UPDATE entries SET c_size = NULL, c_mtime_ns =
# NULL, c_inode = NULL, c_hash = NULL; DELETE FROM entries WHERE size IS NULL".
# Records held in memory before they go into state.db in one transaction (and the journal is
# emptied): a few MiB at most, and one fsync per this many transfers.
FLUSH_AT = 4096

V = TypeVar("V")

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries(
    path TEXT PRIMARY KEY NOT NULL,
    size INTEGER, hash TEXT, etags TEXT, executable INTEGER, last_modified TEXT,
    written_at INTEGER,
    c_size INTEGER, c_mtime_ns INTEGER, c_inode INTEGER, c_hash TEXT
) WITHOUT ROWID;
"""
_BASE_COLUMNS = ("size", "hash", "etags", "executable", "last_modified", "written_at")
_CACHE_COLUMNS = ("c_size", "c_mtime_ns", "c_inode", "c_hash")
_U64 = 1 << 64


class StateError(RuntimeError):
    pass


class _Damaged(ValueError):
    """state.db exists but cannot be used as this pair's BASE."""


def state_path_for(
    state_dir: Path, remote_url: str, local_dir: Path, shard: str | None = None
) -> Path:
    """One state folder per (remote, local folder) pair, so a changed --remote never reuses
    the BASE of another prefix (which would read as 'everything deleted'); and per shard
    ("I/N"), as a shard's BASE holds only its own paths."""
    key = f"{remote_url}\n{local_dir}" + (f"\nshard {shard}" if shard else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return state_dir / digest


class _Half(Mapping[str, V], Generic[V]):
    """BASE or the hash cache: one half of the table's columns, as a read-only mapping.

    Changes not yet in state.db are held in `pending` (None: removed) and win over the
    table. Lookups read a window of rows from the looked-up path on: lookups made in key
    order (the scan, the listing, the planner all go that way) cost one query per window;
    the window grows while it serves lookups and shrinks when it does not.
    """

    _SMALLEST, _LARGEST = 4, 2048

    def __init__(
        self, store: StateStore, columns: tuple[str, ...], decode: Callable[[Any], V]
    ) -> None:
        self._store = store
        self._decode = decode
        self._present = f"{columns[0]} IS NOT NULL"
        listed = ", ".join(columns)
        self._window_sql = (
            f"SELECT path, {listed} FROM entries WHERE path >= ? AND {self._present} "
            "ORDER BY path LIMIT ?"
        )
        self._after_sql = (
            f"SELECT path, {listed} FROM entries WHERE path > ? AND {self._present} "
            "ORDER BY path LIMIT ?"
        )
        self._keys_sql = (
            f"SELECT path FROM entries WHERE path >= ? AND {self._present} ORDER BY path LIMIT ?"
        )
        self._keys_after_sql = (
            f"SELECT path FROM entries WHERE path > ? AND {self._present} ORDER BY path LIMIT ?"
        )
        self.pending: dict[str, V | None] = {}
        self.count = 0  # rows in the table, with pending changes counted in
        self._forget_window()

    # ---- the window ----------------------------------------------------------------------
    def _forget_window(self) -> None:
        self._lo: str | None = None
        self._hi: str | None = None  # None with _lo set: the window runs to the table's end
        self._rows: dict[str, Any] = {}
        self._span = self._SMALLEST
        self._served = 0

    def _from_table(self, path: str) -> V | None:
        row = self._row(path)
        return None if row is None else self._decode(row)

    def _row(self, path: str) -> Any:
        """The table's row of `path` (None: none), undecoded: a window's rows are decoded
        only when looked up, and a write asks only whether the row is there."""
        lo = self._lo
        if lo is not None and lo <= path and (self._hi is None or path <= self._hi):
            self._served += 1
            return self._rows.get(path)
        db = self._store._db
        if db is None:
            return None
        # Grow while the last window served lookups for a good share of its rows; shrink
        # when lookups jump about (the first lookups of a sync, or a sparse few).
        if lo is not None and path > lo and self._served * 4 >= len(self._rows):
            self._span = min(self._span * 2, self._LARGEST)
        elif self._served * 4 < len(self._rows):
            self._span = max(self._span // 2, self._SMALLEST)
        rows = db.execute(self._window_sql, (path, self._span)).fetchall()
        self._rows = {row[0]: row for row in rows}
        self._lo = path
        self._hi = rows[-1][0] if len(rows) == self._span else None
        self._served = 1
        return self._rows.get(path)

    # ---- Mapping -------------------------------------------------------------------------
    def get(self, path: str, default: Any = None) -> Any:
        if path in self.pending:
            value = self.pending[path]
            return default if value is None else value
        value = self._from_table(path)
        return default if value is None else value

    def __getitem__(self, path: str) -> V:
        value: V | None = self.get(path)
        if value is None:
            raise KeyError(path)
        return value

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._has(path)

    def _has(self, path: str) -> bool:
        if path in self.pending:
            return self.pending[path] is not None
        return self._row(path) is not None  # not decoded: only whether it is there

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return self._keys()

    def items(self) -> ItemsView[str, V]:
        return _OrderedItems(self)

    def ordered_items(self, batch: int = 1024) -> Iterator[tuple[str, V]]:
        """Every (path, value) in key order, read a batch of rows at a time (keyed by the last
        path read: safe while changes are made, which show or not)."""
        decode = self._decode
        for path, row, pending in self._in_order(self._window_sql, self._after_sql, batch):
            yield path, row if pending else decode(row)

    def _keys(self, batch: int = 4096) -> Iterator[str]:
        # The paths alone: no row decoded (a sync asks the filter about every BASE path).
        for path, _row, _pending in self._in_order(self._keys_sql, self._keys_after_sql, batch):
            yield path

    def _in_order(self, first: str, after: str, batch: int) -> Iterator[tuple[str, Any, bool]]:
        """(path, table row or pending value, whether pending) for every present path, in
        key order: the table's rows a batch at a time, the pending changes merged in."""
        pending = sorted(self.pending.items())
        index = 0
        db = self._store._db
        rows: list[Any] = db.execute(first, ("", batch)).fetchall() if db is not None else []
        while rows:
            for row in rows:
                path = row[0]
                while index < len(pending) and pending[index][0] < path:
                    if (value := pending[index][1]) is not None:
                        yield pending[index][0], value, True
                    index += 1
                if index < len(pending) and pending[index][0] == path:
                    if (value := pending[index][1]) is not None:
                        yield path, value, True
                    index += 1
                    continue
                yield path, row, False
            db = self._store._db
            if len(rows) < batch or db is None:
                break
            rows = db.execute(after, (rows[-1][0], batch)).fetchall()
        for path, value in pending[index:]:
            if value is not None:
                yield path, value, True

    # ---- changes -------------------------------------------------------------------------
    def put(self, path: str, value: V | None) -> None:
        self.count += (value is not None) - self._has(path)
        self.pending[path] = value

    def written(self) -> None:
        """The pending changes are in the table now."""
        self.pending = {}
        self._forget_window()


class _OrderedItems(ItemsView[str, V]):
    """items() of a _Half: its rows in key order, a batch at a time (not a lookup each)."""

    def __init__(self, half: _Half[V]) -> None:
        super().__init__(half)
        self._half = half

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return self._half.ordered_items()


class StateStore:
    def __init__(self, directory: Path, remote_url: str, local_dir: Path) -> None:
        self.directory = directory
        self.remote_url = remote_url
        self.local_dir = str(local_dir)
        self._db: sqlite3.Connection | None = None  # None until state.db exists
        self.base: _Half[BaseEntry] = _Half(self, _BASE_COLUMNS, _base_of_row)
        self.hash_cache: _Half[HashCacheEntry] = _Half(self, _CACHE_COLUMNS, _cache_of_row)
        self.open_uploads: dict[str, str] = {}  # upload id -> key
        # Keys whose multipart upload was asked for and whose id has not come back yet: if we
        # die there, the server may hold an upload no record names.
        self.creating: set[str] = set()
        # Writes sent whose outcome is not recorded yet: path -> (size, hash, executable). A
        # run killed after the server applied one but before its answer came leaves an object
        # only this tells apart from another writer's (see SyncEngine._settle_pending_writes).
        self.sending: dict[str, tuple[int, str, bool]] = {}
        self._journal: int | None = None  # fd, O_APPEND
        # How state.db and the journal looked when we last loaded or wrote them: another
        # process (a --once beside the daemon) may change them between two of our syncs.
        self._on_disk: tuple[tuple[int, int, int] | None, ...] = ()
        self._journal_created = False  # by us: its folder entry is not yet fsynced
        self._dirty = False

    @property
    def db_path(self) -> Path:
        return self.directory / "state.db"

    @property
    def snapshot_path(self) -> Path:
        """The state file of versions 1 and 2, migrated into state.db on first open."""
        return self.directory / "state.json"

    @property
    def journal_path(self) -> Path:
        return self.directory / "journal.jsonl"

    # ---- loading -------------------------------------------------------------------------
    def load(self) -> None:
        """Read (or re-read) the state from disk; what was in memory is dropped."""
        self.close_journal()
        self._close_db()
        self._reset()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state folder {self.directory}: {exc}") from None
        try:
            if not self.db_path.exists() and self.snapshot_path.exists():
                self._migrate()
            if self.db_path.exists():
                self._open_existing()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state {self.db_path}: {exc}") from None
        except OSError as exc:
            raise StateError(f"cannot read state {self.directory}: {exc}") from None
        replayed = self._replay()
        if replayed:
            self._dirty = True
            log.info("resuming: replayed %d journal record(s) from an interrupted sync", replayed)
        self.remember_disk()

    def _reset(self) -> None:
        self.base = _Half(self, _BASE_COLUMNS, _base_of_row)
        self.hash_cache = _Half(self, _CACHE_COLUMNS, _cache_of_row)
        self.open_uploads, self.creating, self.sending = {}, set(), {}
        self._dirty = False

    def remember_disk(self) -> None:
        """Note how the files look now (call while holding the state lock, after writing)."""
        self._on_disk = self._disk_fingerprint()

    def changed_on_disk(self) -> bool:
        """Whether another process wrote the state since load() or remember_disk()."""
        return self._disk_fingerprint() != self._on_disk

    def _disk_fingerprint(self) -> tuple[tuple[int, int, int] | None, ...]:
        keys: list[tuple[int, int, int] | None] = []
        for path in (self.db_path, self.journal_path):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                keys.append(None)
            else:
                keys.append(identity_of(st))
        return tuple(keys)

    def _connect(self, path: Path) -> sqlite3.Connection:
        # Autocommit: transactions are opened explicitly (_transaction). Not bound to one
        # thread: the commit runs in the engine's executor, never beside another use.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            _configure(db)
        except BaseException:
            db.close()
            raise
        return db

    def _open_existing(self) -> None:
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        try:
            _configure(db)
            meta = self._read_meta(db)
        except (sqlite3.DatabaseError, _Damaged, ValueError, TypeError) as exc:
            db.close()
            self._set_aside(self.db_path, exc)
            return
        if meta is None:  # created, killed before its first transaction ended: nothing in it
            db.close()
            self.db_path.unlink()
            return
        self._db = db
        self.open_uploads = dict(json.loads(meta["open_uploads"]))
        self.creating = set(json.loads(meta["creating"]))
        self.sending = {
            path: (int(size), str(digest), bool(executable))
            for path, (size, digest, executable) in json.loads(meta["sending"]).items()
        }
        for half in (self.base, self.hash_cache):
            (half.count,) = db.execute(
                f"SELECT count(*) FROM entries WHERE {half._present}"
            ).fetchone()

    def _read_meta(self, db: sqlite3.Connection) -> dict[str, str] | None:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not tables:
            return None
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != str(FORMAT_VERSION):
            raise _Damaged(f"unknown state version {meta.get('format')!r}")
        if meta.get("remote") != self.remote_url or meta.get("local_dir") != self.local_dir:
            raise _Damaged("state belongs to another remote/folder pair")
        db.execute("SELECT path FROM entries LIMIT 1").fetchall()  # the table is there
        return meta

    def _set_aside(self, path: Path, why: object) -> None:
        """A damaged BASE must never cause deletions: set it aside and start as if new."""
        stamp = int(time.time())
        aside = path.with_name(f"state.damaged-{stamp}{path.suffix}")
        os.replace(path, aside)
        rollback = path.with_name(path.name + "-journal")
        if rollback.exists():  # belongs to the damaged file, and to no new one
            os.replace(rollback, aside.with_name(aside.name + "-journal"))
        log.error("state %s is unusable (%s); moved to %s", path, why, aside)

    def _create(self, path: Path) -> sqlite3.Connection:
        """A new database at `path` with its schema and this pair's header, in one
        transaction (a kill during it leaves a file with no tables: read as new)."""
        db = self._connect(path)
        try:
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", self._meta_rows().items())
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _meta_rows(self) -> dict[str, str]:
        return {
            "format": str(FORMAT_VERSION),
            "remote": self.remote_url,
            "local_dir": self.local_dir,
            "written": repr(time.time()),
            "open_uploads": json.dumps(self.open_uploads),
            "creating": json.dumps(sorted(self.creating)),
            "sending": json.dumps({path: list(fields) for path, fields in self.sending.items()}),
        }

    # ---- migration of versions 1 and 2 (state.json) --------------------------------------
    def _migrate(self) -> None:
        """state.json into a new state.db, a batch of rows at a time; the new file takes its
        name only when whole, then state.json goes (a kill between: state.db is used)."""
        tmp = self.db_path.with_name(f"state.db.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            handle = open(self.snapshot_path, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise StateError(f"cannot read state {self.snapshot_path}: {exc}") from None
        db: sqlite3.Connection | None = None
        try:
            with handle:
                header, rows = _read_snapshot_header(handle, self.remote_url, self.local_dir)
                self.open_uploads = dict(header.get("open_uploads", {}))
                self.creating = set(header.get("creating", []))
                self.sending = {
                    path: (int(size), str(digest), bool(executable))
                    for path, (size, digest, executable) in header.get("sending", {}).items()
                }
                db = self._create(tmp)
                db.execute("BEGIN IMMEDIATE")
                while batch := list(islice(rows, 2048)):
                    db.executemany(_UPSERT_BOTH, [_row_of_v2(row) for row in batch])
                db.execute("COMMIT")
        except (ValueError, KeyError, TypeError) as exc:
            if db is not None:
                db.close()
            tmp.unlink(missing_ok=True)
            self._reset()
            self._set_aside(self.snapshot_path, exc)
            return
        except OSError as exc:
            if db is not None:
                db.close()
            tmp.unlink(missing_ok=True)
            raise StateError(f"cannot read state {self.snapshot_path}: {exc}") from None
        assert db is not None
        db.close()
        _fsync_file(tmp)
        os.replace(tmp, self.db_path)
        _fsync_dir(self.directory)
        self.snapshot_path.unlink()
        log.info("state %s migrated into %s", self.snapshot_path, self.db_path)

    def _journal_records(self) -> Iterator[tuple[int, list[Any]]]:
        """The journal's records with their line numbers; a line that is none (torn by a
        kill, or bytes a power cut left in the file's tail) is skipped with a warning, never
        fatal."""
        try:
            with open(self.journal_path, "rb") as handle:
                lines = handle.read().split(b"\n")
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                record = json.loads(line.decode())
            except ValueError:  # UnicodeDecodeError too
                log.warning(
                    "%s line %d: ignoring a torn line (interrupted write)",
                    self.journal_path,
                    number,
                )
                continue
            if isinstance(record, list) and record and isinstance(record[0], str):
                yield number, record
            else:
                log.warning(
                    "%s line %d: ignoring a line that is no record: %.80r",
                    self.journal_path,
                    number,
                    line,
                )

    def _replay(self) -> int:
        """Apply the journal's records; the count applied. A record whose fields do not fit
        its kind (their number or their types: `check_record`) is skipped: what it stood for
        is redone or re-checked by the next sync, and a load or a commit that raised would
        fail every sync until the file was removed by hand."""
        replayed = 0
        for number, record in self._journal_records():
            try:
                check_record(record)
                self._apply(record)
            except (IndexError, KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "%s line %d: ignoring a malformed record %.80r: %s",
                    self.journal_path,
                    number,
                    record,
                    exc,
                )
                continue
            replayed += 1
        return replayed

    def _apply(self, record: list[Any]) -> None:
        op = record[0]
        if op == "set":
            self.base.put(record[1], _base_entry(record[2:]))
            self.sending.pop(record[1], None)
        elif op == "del":
            self.base.put(record[1], None)
            self.sending.pop(record[1], None)
        elif op == "sending":
            _, path, size, digest, executable = record
            self.sending[path] = (size, digest, executable)
        elif op == "sending-end":
            self.sending.pop(record[1], None)
        elif op == "hash":
            _, path, size, mtime_ns, inode, digest = record
            self.hash_cache.put(path, (size, mtime_ns, inode, digest))
        elif op == "unhash":
            self.hash_cache.put(record[1], None)
        elif op == "mpu-create":
            self.creating.add(record[1])
        elif op == "mpu-create-end":
            self.creating.discard(record[1])
        elif op == "mpu":
            self.open_uploads[record[1]] = record[2]
            self.creating.discard(record[2])
        elif op == "mpu-end":
            self.open_uploads.pop(record[1], None)

    # ---- recording -----------------------------------------------------------------------
    def _record(self, record: list[Any]) -> None:
        self._apply(record)
        self._dirty = True
        line = (_encode_record(record) + "\n").encode()
        fd = self._open_journal()
        # One write(2) per record, no user-space buffer (see the module docstring). O_APPEND
        # and a short line: a kill leaves at worst one torn last line, which load skips.
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        self._flush_if_full()

    def _open_journal(self) -> int:
        if self._journal is not None:
            return self._journal
        path = self.journal_path
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A torn last line left by a crash must not swallow our first record: start afresh
        # on a new line.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.write(fd, b"\n")
        self._journal, self._journal_created = fd, created
        return fd

    async def _sync_journal(self) -> None:
        """fsync the journal (and its folder entry if we created it), off the event loop.
        A duplicate fd: close_journal may run while the thread still works."""
        assert self._journal is not None
        fd = os.dup(self._journal)
        folder = self.directory if self._journal_created else None
        self._journal_created = False

        def sync() -> None:
            try:
                os.fsync(fd)
                if folder is not None:
                    _fsync_dir(folder)
            except OSError as exc:
                # The record is with the OS already (it survives our death, not a node crash).
                log.warning("cannot fsync the journal %s: %s", self.journal_path, exc)
            finally:
                os.close(fd)

        await asyncio.to_thread(sync)

    def set_base(self, path: str, entry: BaseEntry) -> None:
        self._record(["set", path, *_base_fields(entry)])

    def drop_base(self, path: str) -> None:
        if path in self.base:
            self._record(["del", path])

    def set_hash(self, path: str, entry: HashCacheEntry) -> None:
        if self.hash_cache.get(path) != entry:
            self._record(["hash", path, *entry])

    def drop_hash(self, path: str) -> None:
        if path in self.hash_cache:
            self._record(["unhash", path])

    def note_hash(self, path: str, entry: HashCacheEntry | None) -> None:
        """The hash cache as a scan now sees `path` (None: no row), changed as the scan
        streams by (sidecar/engine/inputs.py). No journal record: the cache is derivable from
        the files; the changes go into state.db a batch at a time, as the records do."""
        self.hash_cache.put(path, entry)
        self._dirty = True
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        if len(self.base.pending) + len(self.hash_cache.pending) >= FLUSH_AT:
            self._write()
            if self._journal is not None:
                os.ftruncate(self._journal, 0)  # every record in it is in state.db now

    def write_sending(self, path: str, size: int, digest: str, executable: bool) -> None:
        """Before a write that creates or replaces an object is sent (PUT, Complete). Its
        outcome (set_base, or write_settled) ends it. Reaching the OS is enough: kill -9 is
        the failure this is for, and a lost answer before a node crash only costs the
        conflict copy the record would have spared."""
        self._record(["sending", path, size, digest, executable])

    def write_settled(self, path: str) -> None:
        """The write of `path` did not land (or another writer's version replaced it)."""
        if path in self.sending:
            self._record(["sending-end", path])

    async def upload_creating(self, key: str) -> None:
        """Durable before CreateMultipartUpload is sent: the server may create the upload and
        we die (or lose its answer) before its id is recorded; the next run then aborts the
        uploads of this key (see SyncEngine._abort_leftover_uploads)."""
        self._record(["mpu-create", key])
        await self._sync_journal()

    def upload_create_ended(self, key: str) -> None:
        """The uploads a create of `key` may have left are aborted (or the id came back)."""
        if key in self.creating:
            self._record(["mpu-create-end", key])

    async def upload_started(self, upload_id: str, key: str) -> None:
        """Durable before the first part is sent: the record that lets a later run abort
        this upload if we die (an fsync per upload of at least --multipart-threshold bytes)."""
        self._record(["mpu", upload_id, key])
        await self._sync_journal()

    def upload_ended(self, upload_id: str) -> None:
        self._record(["mpu-end", upload_id])

    # ---- committing ----------------------------------------------------------------------
    def commit(self) -> bool:
        """Write what changed into state.db in one transaction and empty the journal. False
        if nothing changed."""
        self.close_journal()
        if not self._dirty:
            return False
        self._write()
        self.journal_path.unlink(missing_ok=True)
        self._dirty = False
        return True

    def _write(self) -> None:
        """The pending changes and the header into state.db, in one transaction."""
        db = self._db
        if db is None:
            db = self._db = self._create(self.db_path)
            _fsync_dir(self.directory)
        base, cache = self.base.pending, self.hash_cache.pending
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                _UPSERT_BASE,
                [(path, *_base_columns(entry)) for path, entry in base.items() if entry],
            )
            db.executemany(
                "UPDATE entries SET size = NULL, hash = NULL, etags = NULL, executable = NULL,"
                " last_modified = NULL, written_at = NULL WHERE path = ?",
                [(path,) for path, entry in base.items() if entry is None],
            )
            db.executemany(
                _UPSERT_CACHE,
                [(path, *_cache_columns(entry)) for path, entry in cache.items() if entry],
            )
            db.executemany(
                "UPDATE entries SET c_size = NULL, c_mtime_ns = NULL, c_inode = NULL,"
                " c_hash = NULL WHERE path = ?",
                [(path,) for path, entry in cache.items() if entry is None],
            )
            # Rows left with neither half: only those changed, never a scan of the table.
            db.executemany(
                "DELETE FROM entries WHERE path = ? AND size IS NULL AND c_size IS NULL",
                [
                    (path,)
                    for half in (base, cache)
                    for path, entry in half.items()
                    if entry is None
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                self._meta_rows().items(),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.base.written()
        self.hash_cache.written()

    def close_journal(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _configure(db: sqlite3.Connection) -> None:
    # A rollback journal and an fsync per commit: a transaction is all there or not at all
    # after kill -9 or a power cut. Commits are rare (FLUSH_AT records, or a sync's end).
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=FULL")


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# One encoder for every journal line: json.dumps with any option builds a new one per call
# (a third of the journal's cost at two records per file).
_encode_record = json.JSONEncoder(separators=(",", ":")).encode

# ---- rows of state.db ------------------------------------------------------------------
_UPSERT_BASE = (
    "INSERT INTO entries(path, size, hash, etags, executable, last_modified, written_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size = excluded.size,"
    " hash = excluded.hash, etags = excluded.etags, executable = excluded.executable,"
    " last_modified = excluded.last_modified, written_at = excluded.written_at"
)
_UPSERT_CACHE = (
    "INSERT INTO entries(path, c_size, c_mtime_ns, c_inode, c_hash) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT(path) DO UPDATE SET c_size = excluded.c_size,"
    " c_mtime_ns = excluded.c_mtime_ns, c_inode = excluded.c_inode, c_hash = excluded.c_hash"
)
_UPSERT_BOTH = "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _base_columns(entry: BaseEntry) -> tuple[Any, ...]:
    # ETags as a JSON list: they come from XML and headers and may hold any text.
    return (
        entry.size,
        entry.hash,
        _encode_record(entry.etags),
        int(entry.executable),
        entry.last_modified,
        entry.written_at,
    )


def _cache_columns(entry: HashCacheEntry) -> tuple[Any, ...]:
    size, mtime_ns, inode, digest = entry
    # SQLite integers are signed 64-bit; an inode may use all 64 bits (stored wrapped).
    return size, mtime_ns, inode - _U64 if inode >= _U64 >> 1 else inode, digest


def _base_of_row(row: Any) -> BaseEntry:
    _path, size, digest, etags, executable, last_modified, written_at = row
    return BaseEntry(
        size, digest, tuple(json.loads(etags)), bool(executable), last_modified, written_at
    )


def _cache_of_row(row: Any) -> HashCacheEntry:
    _path, size, mtime_ns, inode, digest = row
    return size, mtime_ns, inode % _U64, digest


def _row_of_v2(row: list[Any]) -> tuple[Any, ...]:
    """A row of state.json (version 2: [path, base fields, hash fields]) as a row of state.db."""
    path, base_fields, hash_fields = row
    base = _base_columns(_base_entry(base_fields)) if base_fields is not None else (None,) * 6
    if hash_fields is not None:
        size, mtime_ns, inode, digest = hash_fields
        cache = _cache_columns((int(size), int(mtime_ns), int(inode), str(digest)))
    else:
        cache = (None,) * 4
    if not isinstance(path, str):
        raise TypeError(f"a path that is no string: {path!r}")
    return (path, *base, *cache)


# ---- state.json, versions 1 and 2 (read once, to migrate) --------------------------------
def _read_snapshot_header(
    handle: TextIO, remote_url: str, local_dir: str
) -> tuple[dict[str, Any], Iterator[list[Any]]]:
    """Version 2: a header line, one line per path, an end line with the count; the rows come
    a batch of lines at a time (raising ValueError if the file is cut short). Version 1 (one
    JSON object) is read whole."""
    header = json.loads(handle.readline())
    version = header.get("version")
    if version not in (1, 2):
        raise ValueError(f"unknown state version {version!r}")
    if header.get("remote") != remote_url or header.get("local_dir") != local_dir:
        raise ValueError("state belongs to another remote/folder pair")
    if version == 1:
        return header, _v1_rows(header)
    return header, _v2_rows(handle)


def _v2_rows(handle: TextIO) -> Iterator[list[Any]]:
    for index, row in enumerate(_rows_of(handle)):
        if isinstance(row, dict):  # the end line
            if row.get("end") != index:
                raise ValueError(f"the state lists {index} paths, its end says {row}")
            return
        yield row
    raise ValueError("the state ends before its end line (cut short)")


def _rows_of(handle: TextIO, batch: int = 2048) -> Iterator[Any]:
    """The JSON value of each line, parsed a batch of lines at a time: one parse call per
    line cost ~30% more than one per batch, and a batch holds a few hundred KiB at most."""
    while lines := list(islice(handle, batch)):
        yield from json.loads("[" + ",".join(lines) + "]")


def _v1_rows(data: dict[str, Any]) -> Iterator[list[Any]]:
    """The rows of a version-1 snapshot, as version 2 stores them."""
    base, hashes = data["base"], data["hashes"]
    for path, fields in base.items():
        yield [path, fields, hashes.get(path)]
    for path, cached in hashes.items():
        if path not in base:
            yield [path, None, cached]


def _base_fields(entry: BaseEntry) -> list[Any]:
    fields = [entry.size, entry.hash, list(entry.etags), entry.executable, entry.last_modified]
    if entry.written_at:
        fields.append(entry.written_at)
    return fields


def _base_entry(fields: list[Any]) -> BaseEntry:
    size, digest, etags, *rest = fields
    executable = bool(rest[0]) if rest else False
    last_modified = str(rest[1]) if len(rest) > 1 else ""
    written_at = rest[2] if len(rest) > 2 and isinstance(rest[2], int) else 0
    return BaseEntry(
        size,
        digest,
        tuple(etags),
        executable,
        last_modified,
        written_at,
    )
