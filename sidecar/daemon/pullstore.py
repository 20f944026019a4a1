"""The downloads of a --ready-when priority pull, on disk (issue 12): what is still pending,
in what order it starts, and what failed, so a first pull of a million files holds none of
them in memory (a queue in memory held ~1 KiB per file: the action, a heap entry, a dict
entry for its phase and another for its size).

One scratch SQLite file in the state folder (beside the plan spool, never in the synced
folder), with no journal and no fsync: it lives as long as the daemon and is rebuilt by
each pull from its fresh plan (a stopped pull's rest is planned again from a new listing),
so a file a killed daemon left is thrown away by the next one. Rows are keyed by path (what
/wait asks: a file, or a folder as a range of paths); the order of the queue is an index on
(rank, size, path) of the rows not started yet, so the next file is one index lookup.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sidecar.core.model import Action
from sidecar.engine.spool import (
    ACTION_COLUMNS,
    ACTION_FIELDS,
    action_of,
    action_row,
    open_scratch,
    remove_scratch,
)

QUEUE_NAME = "pull-queue.db"
_BATCH = 1000  # rows per insert
PRIORITY_RANK = 0  # sidecar/core/priority.Phase.PRIORITY: the ranks at or below come first

_TABLE = """
CREATE TABLE {name} (
    kind TEXT, path TEXT PRIMARY KEY, keep_copy INTEGER, copy TEXT,
    l_size INTEGER, l_mtime INTEGER, l_inode INTEGER, l_exec INTEGER, l_hash TEXT,
    r_key TEXT, r_size INTEGER, r_etag TEXT, r_modified TEXT, r_hash TEXT, r_exec INTEGER,
    r_md5 INTEGER,
    rank INTEGER, phase INTEGER, size INTEGER, taken INTEGER DEFAULT 0
) WITHOUT ROWID;
"""
_FAILED = "CREATE TABLE failed (seq INTEGER PRIMARY KEY, path TEXT UNIQUE, reason TEXT);"
# The queue: rows not started yet, in the order they start.
_ORDER = "CREATE INDEX pending_order ON pending (rank, size, path) WHERE taken = 0;"
_INSERT = (
    f"INSERT OR REPLACE INTO fresh ({ACTION_COLUMNS}, rank, phase, size) "
    f"VALUES ({', '.join(['?'] * (ACTION_FIELDS + 3))})"
)
_FIRST = "SELECT path FROM pending WHERE taken = 0"
_IN_ORDER = " ORDER BY rank, size, path LIMIT 1"
_TAKE = (
    "UPDATE pending SET taken = 1 WHERE path IN ({}) "
    f"RETURNING {ACTION_COLUMNS}, rank, phase, size"
)
WINDOW = 64  # rows read ahead from the queue's order
GONE_BATCH = 256  # arrivals deleted in one statement

_Entry = tuple[Action, int, int, int]  # a row of the queue: action, rank, phase, size


def _entry(row: Sequence[Any]) -> _Entry:
    rank, phase, size = row[ACTION_FIELDS : ACTION_FIELDS + 3]
    return action_of(row), int(rank), int(phase), int(size)


def _order(entry: _Entry) -> tuple[int, int, str]:
    return entry[1], entry[3], entry[0].path


def covering(specs: Iterable[str]) -> tuple[str, list[str]]:
    """An SQL condition on `path` that holds for the paths waiting for any of `specs` covers
    (sidecar/core/priority.covers: the file, or every path below the folder; '' is all),
    with its parameters: a range of the primary key per spec. '0' is the character after
    '/', and SQLite compares text as bytes, which for UTF-8 is Python's order."""
    terms: list[str] = []
    params: list[str] = []
    for spec in specs:
        if not spec:
            return "1", []
        terms.append("(path = ? OR (path > ? AND path < ?))")
        params += [spec, spec + "/", spec + "0"]
    return ("(" + " OR ".join(terms) + ")") if terms else "0", params


class PullStore:
    """The pending downloads (path -> action, phase, rank, size, started) and the failed
    paths (in the order they failed) of the priority pull; `files` and `nbytes`: what is
    pending, kept as counts so /status and /metrics never sum the table."""

    def __init__(self, folder: Path | None) -> None:
        """In `folder` (the state folder); None: in memory (a queue built by a test)."""
        self.path = None if folder is None else folder / QUEUE_NAME
        if self.path is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None)
        else:
            remove_scratch(self.path)  # a killed daemon's
            self._db = open_scratch(self.path)
        self._db.executescript(_TABLE.format(name="pending") + _FAILED + _ORDER)
        self.files = 0
        self.nbytes = 0
        self.untaken = 0  # rows of the queue not started yet
        self.priority_files = 0  # rows of the PRIORITY phase, and their bytes (at the plan)
        self.priority_bytes = 0
        self._last_rank = PRIORITY_RANK
        self._any_failed = False
        self._window: deque[_Entry] = deque()  # marked started, not handed out yet
        self._sizes: dict[str, int] = {}  # handed out by this plan, not popped yet
        self._gone: list[tuple[str]] = []  # popped, still to delete
        self._staged: list[tuple[Any, ...]] = []

    # ---- a new plan: staged beside the pending rows, which stay the truth until `commit` ---
    def stage(self, downloads: Iterable[Action], phase_of: Callable[[str, int], int]) -> None:
        self._flush_gone()
        self._window.clear()
        self._sizes.clear()
        self._db.executescript("DROP TABLE IF EXISTS fresh;" + _TABLE.format(name="fresh"))
        rows = self._staged
        for action in downloads:
            size = action.remote.size if action.remote else 0
            phase = phase_of(action.path, size)
            rows.append((*action_row(action), phase, phase, size))
            if len(rows) >= _BATCH:
                self._flush()
        self._flush()

    def _flush(self) -> None:
        if self._staged:
            self._db.executemany(_INSERT, self._staged)
            self._staged.clear()

    def unstage(self, path: str) -> Action | None:
        """Take a staged download out of the plan (.syncpriority, fetched before the rest)."""
        row = self._db.execute(
            f"DELETE FROM fresh WHERE path = ? RETURNING {ACTION_COLUMNS}", (path,)
        ).fetchone()
        return None if row is None else action_of(row)

    def rephase(self, phase_of: Callable[[str, int], int]) -> None:
        """The staged rows' phases again, with other rules (.syncpriority's, just fetched)."""
        after = ""
        while rows := self._db.execute(
            "SELECT path, size FROM fresh WHERE path > ? ORDER BY path LIMIT ?", (after, _BATCH)
        ).fetchall():
            self._db.executemany(
                "UPDATE fresh SET phase = ?, rank = ? WHERE path = ?",
                [(phase, phase, path) for path, size in rows for phase in [phase_of(path, size)]],
            )
            after = rows[-1][0]

    def commit(self) -> None:
        """The staged plan becomes what is pending (and the queue, nothing started)."""
        db = self._db
        self._flush_gone()
        db.executescript(
            "DROP TABLE pending; ALTER TABLE fresh RENAME TO pending;"
            "CREATE INDEX pending_order ON pending (rank, size, path) WHERE taken = 0;"
        )
        files, nbytes, last = db.execute(
            "SELECT COUNT(*), TOTAL(size), MAX(rank) FROM pending"
        ).fetchone()
        first_files, first_bytes = db.execute(
            "SELECT COUNT(*), TOTAL(size) FROM pending WHERE phase = ?", (PRIORITY_RANK,)
        ).fetchone()
        self.files = self.untaken = int(files)
        self.nbytes = int(nbytes)
        self.priority_files, self.priority_bytes = int(first_files), int(first_bytes)
        self._last_rank = PRIORITY_RANK if last is None else max(int(last), PRIORITY_RANK)

    # ---- the queue ----------------------------------------------------------------------
    # The next WINDOW rows in order are read (and marked started) in one statement and handed
    # out from memory; a boost puts them back (the boosted rows go first), and arrivals are
    # deleted GONE_BATCH at a time, before anything reads what is pending: a few statements
    # per hundred files instead of three per file.
    def take(self, priority_only: bool, big: int | None) -> tuple[Action, int, int] | None:
        """The next download to start (marked started), its rank and phase, or None when none
        may start now: with `priority_only` none ranked after the priority set; with `big`,
        none of at least that size ranked after it (a large file is in flight)."""
        window = self._window
        if not window:
            self._fill(priority_only)
        for index, entry in enumerate(window):
            _action, rank, _phase, size = entry
            if big is None or rank <= PRIORITY_RANK or size < big:
                del window[index]
                return self._handed(entry)
        if big is None or not window:
            return None
        # Every row of the window is large and ranked after the priority set, and so is every
        # row before the first small one after them: one index range per rank.
        path = self._smaller(window[-1][1], big)
        row = self._db.execute(_TAKE.format("?"), (path,)).fetchone()
        return None if row is None else self._handed(_entry(row))

    def _fill(self, priority_only: bool) -> None:
        first = _FIRST + (" AND rank <= ?" if priority_only else "") + _IN_ORDER
        rows = self._db.execute(
            _TAKE.format(first.replace("LIMIT 1", f"LIMIT {WINDOW}")),
            (PRIORITY_RANK,) * priority_only,
        ).fetchall()
        # RETURNING gives the rows in no set order.
        self._window.extend(sorted(map(_entry, rows), key=_order))

    def _handed(self, entry: _Entry) -> tuple[Action, int, int]:
        action, rank, phase, size = entry
        self.untaken -= 1
        self._sizes[action.path] = size
        return action, rank, phase

    def _unwindow(self) -> None:
        if self._window:
            self._db.executemany(
                "UPDATE pending SET taken = 0 WHERE path = ?",
                [(entry[0].path,) for entry in self._window],
            )
            self._window.clear()

    def _smaller(self, first_rank: int, big: int) -> str | None:
        """The first path below `big` bytes from `first_rank` on (every row before is big):
        one index range per rank, never a walk over the big files."""
        for rank in range(first_rank, self._last_rank + 1):
            row = self._db.execute(
                _FIRST + " AND rank = ? AND size < ?" + _IN_ORDER, (rank, big)
            ).fetchone()
            if row is not None:
                return str(row[0])
        return None

    def boost(self, specs: Iterable[str], rank: int) -> None:
        """Every pending path under `specs` not started yet moves to `rank` (the front)."""
        self._unwindow()
        where, params = covering(specs)
        self._db.execute(
            f"UPDATE pending SET rank = ? WHERE taken = 0 AND rank <> ? AND {where}",
            [rank, rank, *params],
        )

    # ---- what is pending ----------------------------------------------------------------
    def pop(self, path: str) -> int | None:
        """Out of the pending (arrived, failed or left alone): its size, None if not pending."""
        size = self._sizes.pop(path, None)
        if size is not None:  # handed out by this plan: its row goes with the next batch
            self._gone.append((path,))
            if len(self._gone) >= GONE_BATCH:
                self._flush_gone()
        else:
            self._flush_gone()
            found = self._db.execute(
                "DELETE FROM pending WHERE path = ? RETURNING size", (path,)
            ).fetchone()
            if found is None:
                return None
            size = int(found[0])
        self.files -= 1
        self.nbytes -= size
        return size

    def _flush_gone(self) -> None:
        if self._gone:
            self._db.executemany("DELETE FROM pending WHERE path = ?", self._gone)
            self._gone.clear()

    def __contains__(self, path: object) -> bool:
        self._flush_gone()
        row = self._db.execute("SELECT 1 FROM pending WHERE path = ?", (path,)).fetchone()
        return row is not None

    def any_under(self, specs: Iterable[str]) -> bool:
        self._flush_gone()
        where, params = covering(specs)
        query = f"SELECT 1 FROM pending WHERE {where} LIMIT 1"
        return self._db.execute(query, params).fetchone() is not None

    def under(self, specs: Iterable[str], limit: int) -> tuple[list[str], int, int]:
        """The first `limit` pending paths under `specs` by name, how many there are, and
        their bytes."""
        self._flush_gone()
        where, params = covering(specs)
        db = self._db
        names = [
            path
            for (path,) in db.execute(
                f"SELECT path FROM pending WHERE {where} ORDER BY path LIMIT ?", [*params, limit]
            )
        ]
        count, nbytes = db.execute(
            f"SELECT COUNT(*), TOTAL(size) FROM pending WHERE {where}", params
        ).fetchone()
        return names, int(count), int(nbytes)

    # ---- what failed ----------------------------------------------------------------------
    def fail(self, path: str, reason: str) -> None:
        """Failed (again: the same place in the order, as a dict keeps it)."""
        self._any_failed = True
        self._db.execute(
            "INSERT INTO failed (path, reason) VALUES (?, ?) "
            "ON CONFLICT (path) DO UPDATE SET reason = excluded.reason",
            (path, reason),
        )

    def unfail(self, path: str) -> None:
        if self._any_failed:  # a statement per arrival saved in the usual case
            self._db.execute("DELETE FROM failed WHERE path = ?", (path,))

    def clear_failed(self) -> None:
        self._db.execute("DELETE FROM failed")
        self._any_failed = False

    def failed_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM failed").fetchone()[0])

    def failed(
        self, specs: Iterable[str] | None = None, limit: int = -1
    ) -> Iterator[tuple[str, str]]:
        """(path, why) of the failed paths (under `specs`), in the order they failed."""
        where, params = ("1", []) if specs is None else covering(specs)
        query = f"SELECT path, reason FROM failed WHERE {where} ORDER BY seq LIMIT ?"
        yield from self._db.execute(query, [*params, limit]).fetchall()

    def close(self) -> None:
        self._db.close()
        if self.path is not None:
            remove_scratch(self.path)
