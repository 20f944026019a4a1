"""A plan's actions on disk while a sync runs: written as the planner's walk decides them,
read back phase by phase (sidecar/core/phases.py) as they are carried out, so a first pull of
a million files never holds a million actions.

One SQLite file in the state folder (never in the synced folder), scratch: no journal, no
fsync, removed when the sync ends and, after a kill, by the next sync (it holds the state
lock). Rows are keyed (phase, -bytes, seq): each phase reads back in plan order, and the
transfers biggest first (equal sizes in plan order), by walking the key, with no sort.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.core.model import Action, ActionKind, LocalFile, RemoteObject
from sidecar.core.phases import PHASE_OF, Phase, action_bytes

SPOOL_NAME = "plan-spool.db"
_BATCH = 1000  # rows per insert, and per fetch when read back

_COLUMNS = (
    "phase, neg_bytes, seq, kind, path, keep_copy, copy, "
    "l_size, l_mtime, l_inode, l_exec, l_hash, "
    "r_key, r_size, r_etag, r_modified, r_hash, r_exec, r_md5"
)  # the key, then ACTION_COLUMNS
_SCHEMA = """
CREATE TABLE plan (
    phase INTEGER, neg_bytes INTEGER, seq INTEGER, kind TEXT, path TEXT, keep_copy INTEGER,
    copy TEXT, l_size INTEGER, l_mtime INTEGER, l_inode INTEGER, l_exec INTEGER, l_hash TEXT,
    r_key TEXT, r_size INTEGER, r_etag TEXT, r_modified TEXT, r_hash TEXT, r_exec INTEGER,
    r_md5 INTEGER,
    PRIMARY KEY (phase, neg_bytes, seq)
) WITHOUT ROWID;
"""


@dataclass(slots=True)
class Counts:
    """What the guards and the progress need, counted as actions are spooled."""

    actions: int = 0
    transfers: int = 0  # actions of the transfer phase...
    transfer_bytes: int = 0  # ...and the bytes they move
    download_bytes: int = 0


class PlanSpool:
    """Actions in, by `add` (the planner's sink); out, by phase, through `keeps` (the rules
    over the whole plan, sidecar/core/planrules.py, known once the walk is done)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / SPOOL_NAME
        remove_scratch(self.path)  # a killed sync's
        self._db = open_scratch(self.path)
        self._db.executescript(_SCHEMA)
        self._rows: list[tuple[Any, ...]] = []
        self.counts = Counts()
        self.keeps: Callable[[Action], bool] = lambda _action: True

    def add(self, action: Action) -> None:
        counts = self.counts
        phase = PHASE_OF[action.kind]
        size = action_bytes(action)
        if phase is Phase.TRANSFER:
            counts.transfers += 1
            counts.transfer_bytes += size
        if action.kind is ActionKind.DOWNLOAD:
            counts.download_bytes += size
        self._rows.append((int(phase), -size, counts.actions, *action_row(action)))
        counts.actions += 1
        if len(self._rows) >= _BATCH:
            self.flush()

    def reset(self) -> None:
        """Empty again (the walk starts over after an OutOfOrder)."""
        self._rows.clear()
        self._db.execute("DELETE FROM plan")
        self.counts = Counts()

    def flush(self) -> None:
        if self._rows:
            self._db.executemany(
                f"INSERT INTO plan ({_COLUMNS}) VALUES ({', '.join(['?'] * 19)})", self._rows
            )
            self._rows.clear()

    def phase(self, phase: Phase) -> Iterator[Action]:
        """The kept actions of one phase; the transfers biggest first, each phase otherwise
        in plan order."""
        self.flush()
        cursor = self._db.execute(
            f"SELECT {_COLUMNS} FROM plan WHERE phase = ? ORDER BY neg_bytes, seq", (int(phase),)
        )
        try:
            while rows := cursor.fetchmany(_BATCH):
                for row in rows:
                    action = action_of(row[3:])
                    if self.keeps(action):
                        yield action
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the spool closed first
                cursor.close()

    def transfers_in_plan_order(self) -> Iterator[Action]:
        """The kept transfers in plan order (a sort: only after a failed delete)."""
        self.flush()
        cursor = self._db.execute(
            f"SELECT {_COLUMNS} FROM plan WHERE phase = ? ORDER BY seq", (int(Phase.TRANSFER),)
        )
        try:
            while rows := cursor.fetchmany(_BATCH):
                yield from filter(self.keeps, (action_of(row[3:]) for row in rows))
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the spool closed first
                cursor.close()

    def close(self) -> None:
        self._rows.clear()
        self._db.close()
        remove_scratch(self.path)


# ---- scratch SQLite files of a sync (this plan spool, inputs.Spool after an OutOfOrder) -----
def open_scratch(path: Path) -> sqlite3.Connection:
    """An SQLite file that lives for one sync: no journal, no fsync (a killed sync's is
    thrown away by the next one, which holds the state lock)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;")
    return db


def remove_scratch(path: Path) -> None:
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(path) + suffix).unlink()


LOCAL_FIELDS = 5  # columns of local_row
REMOTE_FIELDS = 7  # columns of remote_row


def local_row(lf: LocalFile | None) -> tuple[Any, ...]:
    if lf is None:
        return (None,) * LOCAL_FIELDS
    return (lf.size, lf.mtime_ns, lf.inode, lf.executable, lf.hash)


def local_of(row: Sequence[Any]) -> LocalFile | None:
    size, mtime_ns, inode, executable, digest = row
    return None if size is None else LocalFile(size, mtime_ns, inode, bool(executable), digest)


def remote_row(ro: RemoteObject | None) -> tuple[Any, ...]:
    if ro is None:
        return (None,) * REMOTE_FIELDS
    return (
        ro.key,
        ro.size,
        ro.etag,
        ro.last_modified,
        ro.hash,
        ro.executable,
        ro.md5_matches_local,
    )


def remote_of(row: Sequence[Any]) -> RemoteObject | None:
    key, size, etag, last_modified, digest, executable, md5 = row
    if key is None:
        return None
    return RemoteObject(
        key,
        size,
        etag,
        last_modified,
        digest,
        None if executable is None else bool(executable),
        None if md5 is None else bool(md5),
    )


ACTION_COLUMNS = (
    "kind, path, keep_copy, copy, l_size, l_mtime, l_inode, l_exec, l_hash, "
    "r_key, r_size, r_etag, r_modified, r_hash, r_exec, r_md5"
)  # action_row's, in its order: the plan spool's and the priority queue's (daemon/pullstore)
ACTION_FIELDS = 4 + LOCAL_FIELDS + REMOTE_FIELDS


def action_row(action: Action) -> tuple[Any, ...]:
    return (
        str(action.kind),
        action.path,
        action.keep_conflict_copy,
        action.conflict_copy,
        *local_row(action.local),
        *remote_row(action.remote),
    )


def action_of(row: Sequence[Any]) -> Action:
    """The Action of an action_row (ACTION_COLUMNS in that order)."""
    kind, path, keep, copy = row[:4]
    local = local_of(row[4 : 4 + LOCAL_FIELDS])
    remote = remote_of(row[4 + LOCAL_FIELDS : ACTION_FIELDS])
    return Action(ActionKind(kind), path, local, remote, bool(keep), copy)
