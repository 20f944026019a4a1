"""A sync's inputs as streams in S3 key order (issue 12): the local scan and the remote
listing, each handed to the planner's merge (sidecar/core/merge.py) a chunk at a time, never
as a map of every path.

- The scan walks the folder on a thread of its own (never the engine's executor: the walk
  waits on the merge, and the merge may wait on a hash the executor computes) and hands
  chunks through a small bounded queue: the walk is at most QUEUED chunks ahead.
- The listing's pages come in key order from Store.list (sidecar/s3/fanout.py); folder
  markers are dropped as they pass (a 0-byte "d" is held only until the listing is past
  "d/..."), the sidecar's own .netvol/ keys go to the pruner, and --shard's size tally is
  summed here.
- The hash cache is brought up to what the scan sees as the scan passes: a cached hash is
  used where the file's size, mtime and inode still match, and a row for a path no longer
  scanned (or scanned with another identity) is dropped. The engine records the hashes it
  computes during the walk (sidecar/engine/walk.py). Every change is one the old whole-cache
  replacement made; a no-op over an old tree changes nothing and writes nothing.
- `Spool`: the sorted view for a server that lists out of key order (the merge raises
  OutOfOrder): both inputs go into an SQLite file under the state folder and are read back
  in key order, a batch at a time; bounded in memory whatever the number of files.

`Fed` joins the two worlds: the merge pulls from it as a plain iterator, and the engine
refills it (await fill()) before each step whenever it is empty, so the pure merge never
waits and the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sidecar.core.backup import is_bookkeeping
from sidecar.core.model import FileError, LocalFile, RemoteObject
from sidecar.core.paths import BadKey, key_to_relpath
from sidecar.core.shard import ShardFilter, SizeTally
from sidecar.engine.scan import ScanResult, walk_in_key_order
from sidecar.engine.spool import (
    local_of,
    local_row,
    open_scratch,
    remote_of,
    remote_row,
    remove_scratch,
)
from sidecar.engine.state import StateStore

log = logging.getLogger("sidecar.sync")

V = TypeVar("V")
Chunk = list[tuple[str, V]]

CHUNK = 512  # scanned files handed over at a time
QUEUED = 8  # chunks the scan may be ahead of the merge


class Starved(RuntimeError):
    """The merge pulled from an empty input that was not refilled: a bug in the engine."""


class Fed(Generic[V]):
    """One merge input, filled a chunk at a time from an async source of chunks."""

    def __init__(self, source: AsyncIterator[Chunk[V]]) -> None:
        self._source = source
        self._items: deque[tuple[str, V]] = deque()
        self._done = False

    def __iter__(self) -> Iterator[tuple[str, V]]:
        return self

    def __next__(self) -> tuple[str, V]:
        if self._items:
            return self._items.popleft()
        if self._done:
            raise StopIteration
        raise Starved("a merge input was read before it was refilled")

    # The merge reads at most two items of a side in one step (its first step reads a head,
    # then the one after it).
    @property
    def hungry(self) -> bool:
        return len(self._items) < 2 and not self._done

    async def fill(self) -> None:
        while len(self._items) < 2 and not self._done:
            chunk = await anext(self._source, None)
            if chunk is None:
                self._done = True
            else:
                self._items.extend(chunk)


async def chunks_of(items: Iterator[tuple[str, V]], size: int = CHUNK) -> AsyncIterator[Chunk[V]]:
    """A sync iterator as a source of chunks (a spooled side)."""
    while True:
        chunk = [item for _, item in zip(range(size), items, strict=False)]
        if not chunk:
            return
        yield chunk
        await asyncio.sleep(0)  # a spool of a million rows does not hold the loop


# ---- the local scan ------------------------------------------------------------------------
class ScanPump:
    """walk_in_key_order on its own thread, its chunks through a bounded queue. Use as an
    async context manager: leaving it stops the walk and waits for the thread to end (a
    sync's threads end under its locks)."""

    def __init__(self, root: Path, path_filter: ShardFilter, out: ScanResult) -> None:
        self._root = root
        self._filter = path_filter
        self.out = out
        self._queue: asyncio.Queue[Chunk[LocalFile] | BaseException | None] = asyncio.Queue(QUEUED)
        self._stop = threading.Event()
        self._thread: asyncio.Future[None] | None = None

    async def __aenter__(self) -> ScanPump:
        loop = asyncio.get_running_loop()
        self._thread = loop.run_in_executor(None, self._produce, loop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        cancelled = False
        while not thread.done():
            while not self._queue.empty():  # a put waiting for room gets it, then sees stop
                self._queue.get_nowait()
            try:
                await asyncio.wait({thread}, timeout=0.1)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _put(self, item: Chunk[LocalFile] | BaseException | None, loop: Any) -> bool:
        if self._stop.is_set():
            return False
        asyncio.run_coroutine_threadsafe(self._queue.put(item), loop).result()
        return not self._stop.is_set()

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            chunk: Chunk[LocalFile] = []
            # No hash cache here: the thread never touches the state (CachedHashes, on the loop).
            for item in walk_in_key_order(self._root, self._filter, self.out):
                chunk.append(item)
                if len(chunk) >= CHUNK:
                    if not self._put(chunk, loop):
                        return
                    chunk = []
            if chunk and not self._put(chunk, loop):
                return
            self._put(None, loop)
        except BaseException as exc:  # handed to the loop, raised there
            with contextlib.suppress(BaseException):
                self._put(exc, loop)

    async def chunks(self) -> AsyncIterator[Chunk[LocalFile]]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class CachedHashes:
    """The hash cache applied to the scanned files as they pass in key order, and brought up
    to the scan: rows of paths not scanned, or scanned with another size, mtime or inode,
    are dropped (what the old replacement of the whole cache did, change for change)."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._rows = state.hash_cache.ordered_items()
        self._next: tuple[str, tuple[int, int, int, str]] | None = next(self._rows, None)

    def apply(self, chunk: Chunk[LocalFile]) -> Chunk[LocalFile]:
        state = self._state
        out: Chunk[LocalFile] = []
        for rel, local in chunk:
            row = self._next
            while row is not None and row[0] < rel:
                state.note_hash(row[0], None)  # no file there any more
                row = next(self._rows, None)
            if row is not None and row[0] == rel:
                cached = row[1]
                size, mtime_ns, inode, digest = cached
                if size == local.size and mtime_ns == local.mtime_ns and inode == local.inode:
                    # Built directly: dataclasses.replace took twice as long, on every file.
                    local = LocalFile(size, mtime_ns, inode, local.executable, digest)
                else:
                    state.note_hash(rel, None)  # another file now: hashed again if needed
                row = next(self._rows, None)
            self._next = row
            out.append((rel, local))
        return out

    def finish(self) -> None:
        """After the last scanned file: the rows after it are of files no longer there."""
        row = self._next
        while row is not None:
            self._state.note_hash(row[0], None)
            row = next(self._rows, None)
        self._next = None


async def cached_chunks(
    source: AsyncIterator[Chunk[LocalFile]], cache: CachedHashes
) -> AsyncIterator[Chunk[LocalFile]]:
    async for chunk in source:
        yield cache.apply(chunk)
    cache.finish()


# ---- the remote listing ----------------------------------------------------------------------
@dataclass(slots=True)
class ListingTally:
    """What the listing leaves beside its objects: errors, and every shard's sizes."""

    errors: list[FileError] = field(default_factory=list)
    volume: SizeTally = field(default_factory=SizeTally)  # all shards' objects (--shard)


@dataclass(slots=True)
class _Pending:
    path: str
    obj: RemoteObject
    resolved: bool
    marker: bool = False


class MarkerFilter:
    """Drops folder markers from a listing in key order (what core.paths.folder_markers
    does on a whole map): a 0-byte "d" is a marker when a listed path lies below it. It is
    held, with whatever follows it, until the listing reaches "d/..." (a marker: dropped) or
    passes "d0" (a file: handed on)."""

    def __init__(self) -> None:
        self._queue: deque[_Pending] = deque()
        self._open: list[_Pending] = []

    def push(self, path: str, obj: RemoteObject) -> Chunk[RemoteObject]:
        if not self._queue and obj.size:
            return [(path, obj)]  # nothing held: the common case
        if self._open:
            still: list[_Pending] = []
            for held in self._open:
                if path.startswith(held.path + "/"):
                    held.resolved = held.marker = True
                elif path >= held.path + "0":
                    held.resolved = True
                else:
                    still.append(held)
            self._open = still
        pending = _Pending(path, obj, resolved=obj.size != 0)
        if not pending.resolved:
            self._open.append(pending)
        self._queue.append(pending)
        return self._ready()

    def _ready(self) -> Chunk[RemoteObject]:
        ready: Chunk[RemoteObject] = []
        queue = self._queue
        while queue and queue[0].resolved:
            held = queue.popleft()
            if not held.marker:
                ready.append((held.path, held.obj))
        return ready

    def end(self) -> Chunk[RemoteObject]:
        for held in self._open:
            held.resolved = True
        self._open = []
        return self._ready()


async def listed_chunks(
    pages: AsyncIterator[list[Any]],
    prefix: str,
    path_filter: ShardFilter,
    tally: ListingTally,
    saw_bookkeeping: Callable[[str], None],
    drop_markers: bool = True,
) -> AsyncIterator[Chunk[RemoteObject]]:
    """The listing's wanted objects by relative path, a page at a time, folder markers
    dropped (unless drop_markers is False: a listing out of key order is spooled whole and
    its markers dropped when read back sorted). S3 errors propagate as they are."""
    markers = MarkerFilter()
    async for page in pages:
        chunk: Chunk[RemoteObject] = []
        for item in page:
            try:
                relpath = key_to_relpath(prefix, item.key)
            except BadKey as exc:
                tally.errors.append(FileError(item.key, f"skipped: {exc}"))
                continue
            if relpath is not None and is_bookkeeping(relpath):
                saw_bookkeeping(relpath)  # .netvol/: never data
                continue
            if relpath is None or not path_filter.wants_any_shard(relpath):
                continue
            tally.volume.add(relpath, item.size)
            if not path_filter.wants(relpath):
                continue
            obj = RemoteObject(item.key, item.size, item.etag, item.last_modified)
            if drop_markers:
                chunk.extend(markers.push(relpath, obj))
            else:
                chunk.append((relpath, obj))
        if chunk:
            yield chunk
    if tail := markers.end():
        yield tail


# ---- the sorted view after an OutOfOrder -------------------------------------------------------
class Spool:
    """The scan and the listing in an SQLite file under the state folder, read back in key
    order (SQLite compares TEXT as UTF-8 bytes, as S3 orders keys). Removed when closed."""

    def __init__(self, directory: Path) -> None:
        # A sync runs under the state lock: a spool found here is one a killed run left.
        for stale in directory.glob("spool-*.db"):
            stale.unlink(missing_ok=True)
        self.path = directory / f"spool-{os.getpid()}-{id(self):x}.db"
        self._db = open_scratch(self.path)
        self._db.execute(
            "CREATE TABLE local(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
            " inode INTEGER, executable INTEGER, hash TEXT) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE remote(path TEXT PRIMARY KEY, key TEXT, size INTEGER, etag TEXT,"
            " last_modified TEXT, hash TEXT, executable INTEGER, md5 INTEGER) WITHOUT ROWID"
        )

    def close(self) -> None:
        self._db.close()
        remove_scratch(self.path)

    def add_local(self, chunk: Chunk[LocalFile]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO local VALUES (?, ?, ?, ?, ?, ?)",
            [(p, *local_row(f)) for p, f in chunk],
        )

    def add_remote(self, chunk: list[tuple[str, RemoteObject]]) -> None:
        # A key listed twice: the later one, as a map of the listing kept it.
        self._db.executemany(
            "INSERT OR REPLACE INTO remote VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(p, *remote_row(o)) for p, o in chunk],
        )

    def local(self) -> Iterator[tuple[str, LocalFile]]:
        for row in self._rows("local", "size, mtime_ns, inode, executable, hash"):
            local = local_of(row[1:])
            assert local is not None  # every row was a LocalFile
            yield row[0], local

    def remote(self) -> Iterator[tuple[str, RemoteObject]]:
        columns = "key, size, etag, last_modified, hash, executable, md5"
        for row in self._rows("remote", columns):
            remote = remote_of(row[1:])
            assert remote is not None  # every row was a RemoteObject
            yield row[0], remote

    def _rows(self, table: str, columns: str, batch: int = 2048) -> Iterator[Any]:
        rows = self._db.execute(
            f"SELECT path, {columns} FROM {table} ORDER BY path LIMIT ?", (batch,)
        ).fetchall()
        while rows:
            yield from rows
            if len(rows) < batch:
                return
            rows = self._db.execute(
                f"SELECT path, {columns} FROM {table} WHERE path > ? ORDER BY path LIMIT ?",
                (rows[-1][0], batch),
            ).fetchall()


async def unmarked(
    source: Iterator[tuple[str, RemoteObject]],
) -> AsyncIterator[Chunk[RemoteObject]]:
    """A sorted listing (a spool's), folder markers dropped, a chunk at a time."""
    markers = MarkerFilter()
    async for chunk in chunks_of(source):
        out: Chunk[RemoteObject] = []
        for path, obj in chunk:
            out.extend(markers.push(path, obj))
        if out:
            yield out
    if tail := markers.end():
        yield tail
