"""History records of syncs (issue 14), written and read as streams (issue 12).

- RecordSpool: the entries of the record of the sync under way, on disk as its writes
  happen (a first pull of a million files never holds a million entries), read back in path
  order when the record is written. A scratch SQLite file in the state folder, like the
  plan's (sidecar/engine/spool.py): opened at the first entry, removed when the sync ends,
  and after a kill by the next sync (it holds the state lock).
- History: one record per sync that changed something, one object (or file) each, so that
  replicas writing at once never overwrite each other: finalize records in the bucket under
  `.netvol/history/`, pull records in the state folder (`history/`). A record is whole or
  absent: a local one is renamed into place once written and fsynced; a remote one is one
  PUT, or above RECORD_PART one multipart upload whose Complete makes it appear whole.
  Records are read a line at a time (sidecar/core/backup.py has the format): `open` gives
  the header and the entries as they are read; `records` reads headers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from sidecar.core.backup import (
    HISTORY_DIR,
    RECORD_SUFFIX,
    Entry,
    SyncRecord,
    Tally,
    entry_line,
    format_utc,
    history_key,
    is_sync_id,
    read_record,
    record_lines,
)
from sidecar.engine.spool import open_scratch, remove_scratch
from sidecar.s3 import S3Error, Store

SPOOL_NAME = "record-spool.db"
_BATCH = 1000  # entries per insert, and per fetch when read back
RECORD_PART = 8 * 1024**2  # a remote record above this goes up as a multipart upload
HEADER_PROBE = 64 * 1024  # a remote record's first bytes, read for its header alone


def host_name() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


class RecordSpool:
    """Entries in (`add`, as the sync's writes happen) and out in path order (`lines`,
    `paths`), with their tally kept as they come."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / SPOOL_NAME
        self.tally = Tally()
        self._db: Any = None  # sqlite3.Connection once the first entry comes
        self._rows: list[tuple[bytes, int, bytes]] = []
        remove_scratch(self.path)  # a killed sync's

    def __bool__(self) -> bool:
        return self.tally.entries > 0

    def add(self, entry: Entry) -> None:
        if self._db is None:
            self._db = open_scratch(self.path)
            # Keyed by the path's UTF-8 bytes: SQLite's order is then Python's str order
            # (the order records always had); seq keeps a path's entries in sync order.
            self._db.execute(
                "CREATE TABLE entries (path BLOB, seq INTEGER, line BLOB, "
                "PRIMARY KEY (path, seq)) WITHOUT ROWID"
            )
        self.tally.add(entry)
        key = entry.path.encode("utf-8", "surrogatepass")
        self._rows.append((key, self.tally.entries, entry_line(entry)))
        if len(self._rows) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?)", self._rows)
            self._rows.clear()

    def _select(self, column: str) -> Iterator[Any]:
        if self._db is None:
            return
        self._flush()
        cursor = self._db.execute(f"SELECT {column} FROM entries ORDER BY path, seq")
        try:
            while rows := cursor.fetchmany(_BATCH):
                for (value,) in rows:
                    yield value
        finally:
            cursor.close()

    def lines(self) -> Iterator[bytes]:
        """The entries' record lines (sidecar/core/backup.py entry_line), in path order."""
        return self._select("line")

    def paths(self) -> Iterator[str]:
        return (bytes(key).decode("utf-8", "surrogatepass") for key in self._select("path"))

    def close(self) -> None:
        self._rows.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
            remove_scratch(self.path)


def record_header(
    sync_id: str,
    operation: str,
    side: str,
    remote: str,
    local_dir: str,
    backup: str,
    tally: Tally,
    undoes: str | None = None,
) -> SyncRecord:
    """The header of the record of a sync ending now (its entries are in a RecordSpool)."""
    return SyncRecord(
        sync_id=sync_id,
        time=format_utc(datetime.now(UTC)),
        operation=operation,
        side=side,
        host=host_name(),
        remote=remote,
        local_dir=local_dir,
        backup=backup,
        undoes=undoes,
        tally=tally,
    )


class History:
    """Reads and writes sync records: the bucket's (finalize, undo of a finalize) and this
    state folder's (pull, undo of a pull)."""

    def __init__(self, store: Store, prefix: str, state_folder: Path) -> None:
        self.store = store
        self.prefix = prefix
        self.state_folder = state_folder
        self.local_root = state_folder / "history"

    # ---- writing ---------------------------------------------------------------------
    async def write(self, header: SyncRecord, spool: RecordSpool) -> None:
        """The record of `header` with the spool's entries. Raises S3Error or OSError."""
        if header.side == "remote":
            with self._scratch("record-out-") as handle:
                await _write_lines(handle, record_lines(header, spool.lines()))
                await self._upload(history_key(self.prefix, header.sync_id), handle)
            return
        self.local_root.mkdir(parents=True, exist_ok=True)
        path = self.local_root / (header.sync_id + RECORD_SUFFIX)
        tmp = path.with_suffix(".tmp")
        try:
            with _open_file(tmp, "wb") as handle:
                await _write_lines(handle, record_lines(header, spool.lines()))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _upload(self, key: str, handle: IO[bytes]) -> None:
        """One conditional PUT; a larger record as a multipart upload, a part at a time."""
        size = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        if size <= RECORD_PART:
            await self.store.put(key, handle.read(), {}, if_none_match=True)
            return
        upload_id = await self.store.create_multipart(key, {})
        try:
            etags: list[str] = []
            while part := handle.read(RECORD_PART):
                etags.append(await self.store.upload_part(key, upload_id, len(etags) + 1, part))
            await self.store.complete_multipart(
                key, upload_id, etags, if_none_match=True, expected=(size, {})
            )
        except BaseException:
            with contextlib.suppress(S3Error):
                await self.store.abort_multipart(key, upload_id)
            raise

    # ---- reading ---------------------------------------------------------------------
    async def remote_sizes(self) -> dict[str, int]:
        """The bucket's records: sync id -> bytes."""
        sizes = {}
        start = self.prefix + HISTORY_DIR
        async for page in self.store.list(start):
            for item in page:
                name = item.key[len(start) :]
                if name.endswith(RECORD_SUFFIX) and is_sync_id(name[: -len(RECORD_SUFFIX)]):
                    sizes[name[: -len(RECORD_SUFFIX)]] = item.size
        return sizes

    async def remote_ids(self) -> list[str]:
        return list(await self.remote_sizes())

    def local_ids(self) -> list[str]:
        try:
            names = os.listdir(self.local_root)
        except FileNotFoundError:
            return []
        return [
            n[: -len(RECORD_SUFFIX)]
            for n in names
            if n.endswith(RECORD_SUFFIX) and is_sync_id(n[: -len(RECORD_SUFFIX)])
        ]

    @contextlib.asynccontextmanager
    async def open(
        self, sync_id: str, side: str
    ) -> AsyncIterator[tuple[SyncRecord, Iterator[Entry]]]:
        """A record's header and its entries as they are read (a remote record is fetched
        into a scratch file first). Raises S3Error, OSError or ValueError (unreadable), each
        naming the record, also while the entries are iterated."""
        if side == "remote":
            key = history_key(self.prefix, sync_id)
            with self._scratch("record-in-") as handle:
                await self._download(key, handle)
                handle.seek(0)
                yield _named(key, handle)
            return
        path = self.local_root / (sync_id + RECORD_SUFFIX)
        with _open_file(path, "rb") as handle:
            yield _named(str(path), handle)

    async def read(self, sync_id: str, side: str) -> SyncRecord:
        """A whole record, entries included (restore, tests). Raises as `open` does."""
        async with self.open(sync_id, side) as (record, entries):
            record.entries = list(entries)
        return record

    async def find_side(self, sync_id: str) -> str | None:
        """Where the record of `sync_id` is ('local', 'remote'), or None: there is none."""
        if sync_id in self.local_ids():
            return "local"
        try:
            await self.store.head(history_key(self.prefix, sync_id))
        except S3Error as exc:
            if exc.not_found:
                return None
            raise
        return "remote"

    async def records(
        self, limit: int | None = None, side: str | None = None
    ) -> tuple[list[SyncRecord], list[str]]:
        """Headers (no entries), newest first (at most `limit`); and the records that could
        not be read, by name."""
        ids: list[tuple[str, str, int]] = []
        if side in (None, "remote"):
            ids += [(i, "remote", size) for i, size in (await self.remote_sizes()).items()]
        if side in (None, "local"):
            ids += [(i, "local", 0) for i in self.local_ids()]
        ids.sort(reverse=True)
        if limit is not None:
            ids = ids[:limit]
        records: list[SyncRecord] = []
        problems: list[str] = []
        for sync_id, where, size in ids:
            try:
                records.append(await self.header(sync_id, where, size))
            except (S3Error, OSError, ValueError) as exc:
                problems.append(str(exc))
        return records, problems

    async def header(self, sync_id: str, side: str, size: int = 0) -> SyncRecord:
        """A record's header (no entries); `size`: a remote record's, as listed."""
        if side == "remote" and size > HEADER_PROBE:
            key = history_key(self.prefix, sync_id)
            head = bytearray(HEADER_PROBE)
            await self.store.get_range_into(key, 0, memoryview(head), None, lambda _n: None)
            first, newline, _rest = bytes(head).partition(b"\n")
            if newline:  # else a format 1 record longer than the probe: read whole below
                return _named(key, iter([first + newline]))[0]
        async with self.open(sync_id, side) as (record, _entries):
            return record

    async def _download(self, key: str, handle: IO[bytes]) -> None:
        def restart() -> None:
            handle.seek(0)
            handle.truncate()

        def sink(data: bytes | memoryview) -> None:
            handle.write(data)

        await self.store.get_object(key, None, sink, restart)

    @contextlib.contextmanager
    def _scratch(self, prefix: str) -> Iterator[IO[bytes]]:
        """A scratch file in the state folder, gone when done."""
        self.state_folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=prefix, dir=self.state_folder) as handle:
            yield handle


def _open_file(path: Path, mode: str) -> IO[bytes]:
    """A record file (local, small writes a batch at a time: the event loop's own thread)."""
    return cast(IO[bytes], open(path, mode))


async def _write_lines(handle: IO[bytes], lines: Iterator[bytes]) -> None:
    """The lines into `handle`, a batch at a time, letting the event loop run in between
    (a record of a million entries takes seconds to write)."""
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= _BATCH:
            handle.write(b"".join(batch))
            batch.clear()
            await asyncio.sleep(0)
    handle.write(b"".join(batch))


def _named(where: str, lines: Iterator[bytes]) -> tuple[SyncRecord, Iterator[Entry]]:
    """read_record, its errors naming the record."""
    try:
        record, entries = read_record(lines)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

    def named() -> Iterator[Entry]:
        try:
            yield from entries
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    return record, named()
