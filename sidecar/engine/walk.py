"""The planner's walk over the streamed inputs: the scan, the listing and BASE merged in key
order, every path decided as it streams by (hashed, or asked about in the bucket, first where
its decision needs it), the plan going to its sink as it is decided.

One step of a sync (sidecar/engine/sync.py knows the order of the steps); it gets what it
works with (config, BASE, the store, the I/O threads, the pruner's callbacks) from the sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sidecar.core.agreement import cache_entry, cacheable, learned
from sidecar.core.backup import NETVOL_PREFIX
from sidecar.core.filters import PathFilter
from sidecar.core.merge import OutOfOrder, Triple, merge
from sidecar.core.model import (
    UNHASHED,
    BaseEntry,
    Direction,
    FileError,
    LocalFile,
    RemoteObject,
)
from sidecar.core.options import SyncConfig
from sidecar.core.planner import Walk, needs_remote_hash
from sidecar.core.progress import Progress
from sidecar.core.shard import ShardFilter
from sidecar.engine.execute import run_bounded
from sidecar.engine.fatal import FatalSync
from sidecar.engine.hashing import md5_file, new_content_hasher
from sidecar.engine.inputs import (
    CachedHashes,
    Chunk,
    Fed,
    ListingTally,
    ScanPump,
    Spool,
    cached_chunks,
    chunks_of,
    listed_chunks,
    unmarked,
)
from sidecar.engine.scan import ScanResult, hash_paths
from sidecar.engine.spool import PlanSpool
from sidecar.engine.state import StateStore
from sidecar.s3 import S3Error, Store, read_labels

# The sync's logger: the JSON log's `logger` field is a contract, kept from before the move.
log = logging.getLogger("sidecar.sync")

_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
_V = TypeVar("_V")


@dataclass(slots=True)
class _Held:
    """Paths of the planner's walk waiting for hashes or HEADs: the ones waiting and every
    path after the first of them (decided in key order once the answers are in)."""

    triples: list[Triple[LocalFile, RemoteObject, BaseEntry]] = field(default_factory=list)
    asking: list[Triple[LocalFile, RemoteObject, BaseEntry]] = field(default_factory=list)
    hashing: list[Triple[LocalFile, RemoteObject, BaseEntry]] = field(default_factory=list)

    # A batch of HEADs (or hashes) at a time (enough to keep --concurrency busy), and never
    # more than this many paths held: a first sync over a folder that has the data asks
    # about each.
    ASK_BATCH: ClassVar[int] = 1024
    HOLD_MAX: ClassVar[int] = 8192

    def full(self) -> bool:
        return (
            len(self.asking) >= self.ASK_BATCH
            or len(self.hashing) >= self.ASK_BATCH
            or len(self.triples) >= self.HOLD_MAX
        )


class _NameUnknown(Exception):
    """A conflict copy's name the walk has not asked the bucket about yet."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _NameOracle:
    """Whether a conflict copy's name is in use, without a map of either side: any entry in
    the local folder (an lstat: conflicts are rare), or an object in the bucket (a HEAD,
    asked by the walk before the decision that needs it: `_NameUnknown` until then). After
    the walk, a name never asked about counts as free in the bucket: the transfer that makes
    the copy finds a taken name (a conditional write) and takes the next."""

    def __init__(self, root: Path, path_filter: PathFilter) -> None:
        self._root = str(root)
        self._filter = path_filter
        self.remote: dict[str, bool] = {}
        self.walking = True

    def taken(self, name: str) -> bool:
        try:
            os.lstat(f"{self._root}/{name}")
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError:
            pass  # cannot tell (e.g. no access): the transfer will find out
        else:
            return True
        if not self._filter.wants(name):
            return False  # not in the listing the old map was made of
        known = self.remote.get(name)
        if known is None and self.walking:
            raise _NameUnknown(name)
        return bool(known)

    async def ask(self, store: Store, prefix: str, name: str) -> None:
        try:
            await store.head(prefix + name)
        except S3Error as exc:
            # Unknown (the HEAD failed): taken, so the copy takes another name.
            self.remote[name] = not exc.not_found
            return
        self.remote[name] = True


@dataclass(slots=True)
class Seen:
    """What the streamed walk leaves besides BASE: the walk (its plan, and the counts and
    clashes the rules over the whole plan need), errors, and (--shard) every shard's sizes."""

    hashed_at: int  # before any byte was read: the racy rule's clock
    walk: Walk = field(init=False)
    tally: ListingTally = field(default_factory=ListingTally)
    hash_errors: list[FileError] = field(default_factory=list)
    errors: list[FileError] = field(default_factory=list)


class StreamedWalk:
    """The walk of one sync. `run` decides every path; what it leaves besides BASE (and the
    plan, in `plan` when given) is a `Seen`."""

    def __init__(
        self,
        config: SyncConfig,
        state: StateStore,
        store: Store,
        executor: ThreadPoolExecutor,
        saw_bookkeeping: Callable[[str], None],
        listing_skipped: Callable[[str], None],
        progress: Progress,
    ) -> None:
        self.config = config
        self.progress = progress  # the walk's counts (/status during "scanning")
        self.state = state
        self._store = store
        self._executor = executor
        # The running sync's pruner: the .netvol/ keys listed, and whether the listing
        # left out a part of them.
        self._saw_bookkeeping = saw_bookkeeping
        self._listing_skipped = listing_skipped

    async def run(
        self,
        direction: Direction,
        path_filter: ShardFilter,
        plan: PlanSpool | None,
    ) -> Seen:
        """Every path decided as the scan, the listing and BASE stream by in key order. A
        side out of key order (a server listing so) stops the walk before anything it
        decided is carried out; it is done again over a sorted copy of the scan and the
        listing spooled on disk (what the first try learnt stays in BASE)."""
        try:
            return await self._stream_once(direction, path_filter, None, plan)
        except OutOfOrder as exc:
            log.warning("%s; deciding again over a sorted copy of the scan and the listing", exc)
        if plan is not None:
            plan.reset()  # what the first try decided
        spool = Spool(self.state.directory)  # rare: written from the loop, a chunk at a time
        try:
            return await self._stream_once(direction, path_filter, spool, plan)
        finally:
            spool.close()

    async def _stream_once(
        self,
        direction: Direction,
        path_filter: ShardFilter,
        spool: Spool | None,
        plan: PlanSpool | None,
    ) -> Seen:
        seen = Seen(time.time_ns())
        self.progress.walk_restarted()
        root = self.config.local_dir
        scanned = ScanResult()
        async with contextlib.AsyncExitStack() as stack:
            local: AsyncIterator[Chunk[LocalFile]] = _nothing()
            if root.is_dir():  # a dry-run pull may have no folder yet
                pump = await stack.enter_async_context(ScanPump(root, path_filter, scanned))
                local = pump.chunks()
            listing = self._listed(path_filter, seen.tally, drop_markers=spool is None)
            # Ended with the walk, also when it stops early: its look-ahead tasks with it.
            stack.push_async_callback(listing.aclose)
            remote: AsyncIterator[Chunk[RemoteObject]] = listing
            if spool is not None:
                for_spool: list[tuple[AsyncIterator[Any], Callable[[Any], None]]] = [
                    (local, spool.add_local),
                    (remote, spool.add_remote),
                ]
                for source, add in for_spool:
                    async for chunk in source:
                        add(chunk)
                local, remote = chunks_of(spool.local()), unmarked(spool.remote())
            local = _counted(local, self.progress, "files_scanned")
            remote = _counted(remote, self.progress, "objects_listed")
            local = cached_chunks(local, CachedHashes(self.state))
            base = (
                (path, entry)
                for path, entry in self.state.base.ordered_items()
                if path_filter.wants(path)
            )
            names = _NameOracle(root, path_filter)
            sink = plan.add if plan is not None else None  # None: the plan's own list
            seen.walk = Walk(direction, datetime.now(UTC), names.taken, sink)
            await self._walk(direction, Fed(local), Fed(remote), base, seen, names)
            names.walking = False  # the transfers' conflict copies ask it too
        _log_scan(scanned)
        seen.errors = scanned.errors + seen.hash_errors + seen.tally.errors
        return seen

    async def _listed(
        self, path_filter: ShardFilter, tally: ListingTally, drop_markers: bool
    ) -> AsyncGenerator[Chunk[RemoteObject], None]:
        prefix = self.config.prefix
        # As many keys as the last sync saw: a large prefix lists one round trip sooner.
        # A first sync: every object listed is a download to come, its connection opened
        # while the listing goes on (only on a long link).
        # The fan-out leaves .netvol/ out (backups may outnumber the data); the pruner
        # then lists the oldest of them itself.
        known = len(self.state.base)
        pages = self._store.list(
            prefix,
            expect_keys=known,
            warm=not known,
            skip=frozenset({prefix + NETVOL_PREFIX}),
            skipped=self._listing_skipped,
        )
        try:
            async for chunk in listed_chunks(
                pages, prefix, path_filter, tally, self._saw_bookkeeping, drop_markers
            ):
                yield chunk
        except S3Error as exc:
            if exc.fatal or exc.not_found:
                raise FatalSync(f"cannot list {self.config.remote_url}: {exc.message}") from None
            raise FatalSync(f"listing {self.config.remote_url} failed: {exc.message}") from None

    async def _walk(
        self,
        direction: Direction,
        local: Fed[LocalFile],
        remote: Fed[RemoteObject],
        base: Iterator[tuple[str, BaseEntry]],
        seen: Seen,
        names: _NameOracle,
    ) -> None:
        """Every path decided in key order. A path whose decision waits for a hash or a
        HEAD holds the paths after it until a batch of them is answered (a bounded number),
        so decisions (and the conflict copies they name) come in the same order as with no
        wait at all. A local file is hashed only where its path has a BASE entry or an
        object: any other is sent whatever it holds, and its upload hashes what it sends."""
        held = _Held()
        merged = merge(local, remote, base)
        while True:
            if local.hungry:
                await local.fill()
            if remote.hungry:
                await remote.fill()
            t = next(merged, None)
            if t is None:
                break
            lf = t.local
            if (
                lf is not None
                and lf.hash == UNHASHED
                and (t.base is not None or t.remote is not None)
            ):
                held.hashing.append(t)
            elif needs_remote_hash(lf, t.remote, t.base):
                held.asking.append(t)
            elif not held.triples:
                await self._decide(t, seen, names)
                continue
            held.triples.append(t)
            if held.full():
                await self._decide_held(direction, held, seen, names)
        await self._decide_held(direction, held, seen, names)

    async def _decide_held(
        self, direction: Direction, held: _Held, seen: Seen, names: _NameOracle
    ) -> None:
        """Hash the held files that need it, ask the bucket about the held paths that need
        it, then decide every held path in key order (and let them go)."""
        if held.hashing:
            await self._hash_held(held.hashing, seen)
            held.asking += [t for t in held.hashing if needs_remote_hash(t.local, t.remote, t.base)]
        await self._ask_bucket(held.asking, direction)
        for t in held.triples:
            await self._decide(t, seen, names)
        held.triples.clear()
        held.asking.clear()
        held.hashing.clear()

    async def _hash_held(
        self, waiting: list[Triple[LocalFile, RemoteObject, BaseEntry]], seen: Seen
    ) -> None:
        """The content hash of each waiting file (in batches on the executor); one that
        cannot be read is an error and takes no part (as if not scanned). A hash that is not
        racy goes into the hash cache."""
        root = self.config.local_dir
        files = [(t.path, t.local.size) for t in waiting if t.local is not None]
        digests = await hash_paths(root, files, self._executor, self._hashed)
        for t in waiting:
            digest = digests[t.path]
            if isinstance(digest, FileError):
                seen.hash_errors.append(digest)
                t.local = None
                continue
            assert t.local is not None
            t.local = local = replace(t.local, hash=digest)
            if cacheable(local, seen.hashed_at):
                self.state.note_hash(t.path, cache_entry(local))

    def _hashed(self, files: int) -> None:
        self.progress.files_hashed += files

    async def _decide(
        self,
        t: Triple[LocalFile, RemoteObject, BaseEntry],
        seen: Seen,
        names: _NameOracle,
    ) -> None:
        """Record what the listing teaches about this unchanged object (core.agreement),
        then plan the path on BASE as it now is."""
        path, lf, ro, be = t.path, t.local, t.remote, t.base
        if ro is not None and (entry := learned(be, ro)) is not None:
            self.state.set_base(path, entry)
            be = entry
        while True:
            try:
                seen.walk.decide(path, lf, ro, be)
                self.progress.paths_compared += 1
                return
            except _NameUnknown as unknown:
                # A conflict copy's name: is it an object in the bucket? (rare: a HEAD each)
                await names.ask(self._store, self.config.prefix, unknown.name)

    async def _ask_bucket(
        self,
        wanted: list[Triple[LocalFile, RemoteObject, BaseEntry]],
        direction: Direction,
    ) -> None:
        """HEAD only the objects whose content hash could change a decision.

        An ETag is the MD5 of the bytes only for a single-part object stored without SSE-KMS
        or SSE-C (the HEAD's encryption headers tell). Where it is not, equality is unknown:
        a pull downloads and compares (the download decides, Transfers._place); a finalize
        reads the object and hashes it here, as it would otherwise upload equal bytes over
        the object and keep a needless conflict copy of it."""
        if not wanted:
            return

        async def resolve(t: Triple[LocalFile, RemoteObject, BaseEntry]) -> None:
            obj = t.remote
            assert obj is not None
            try:
                info = await self._store.head(obj.key)
            except S3Error as exc:
                log.warning("%s: HEAD failed (%s); treating its content as unknown", obj.key, exc)
                return
            finally:
                self.progress.objects_checked += 1
            labels = read_labels(info.metadata)
            digest = labels.hash
            if digest:
                t.remote = replace(obj, hash=digest, executable=labels.executable)
            elif t.local is None:
                return  # asked for the mode and hash only (planner.needs_remote_hash)
            elif _PLAIN_MD5.match(obj.etag) and not info.etag_is_opaque:
                # A foreign single-part object: its ETag is the MD5 of its bytes.
                md5 = await asyncio.get_running_loop().run_in_executor(
                    self._executor, md5_file, self.config.local_dir / t.path
                )
                t.remote = replace(obj, md5_matches_local=(md5 == obj.etag))
            elif direction is Direction.FINALIZE:
                t.remote = await _hash_by_download(self._store, obj)

        # A bounded pool of workers, not a task per object: a first sync over a folder that
        # already holds the data asks for every object (~2 KiB a task at 100,000 files).
        await run_bounded(wanted, resolve, self.config.concurrency)  # a HEAD each


async def _nothing() -> AsyncIterator[Chunk[LocalFile]]:
    return
    yield


async def _counted(
    chunks: AsyncIterator[Chunk[_V]], progress: Progress, count: str
) -> AsyncIterator[Chunk[_V]]:
    """The chunks as they are, each one's length added to `progress.<count>` (a chunk at a
    time: nothing added per path)."""
    async for chunk in chunks:
        setattr(progress, count, getattr(progress, count) + len(chunk))
        yield chunk


def _log_scan(scanned: ScanResult) -> None:
    if scanned.temps_removed:
        log.info("removed %d temp file(s) of an interrupted run", scanned.temps_removed)
    if scanned.symlinks_skipped:
        log.info("skipped %d symlink(s): symlinks are not synced", scanned.symlinks_skipped)
    if scanned.specials_skipped:
        log.info(
            "skipped %d special file(s) (FIFO, socket, device): only regular files are synced",
            scanned.specials_skipped,
        )


async def _hash_by_download(store: Store, obj: RemoteObject) -> RemoteObject:
    """The object with the hash of its bytes, read (pinned to the listed ETag) and hashed
    as they stream; as it was (content unknown) if it cannot be read."""
    hasher = new_content_hasher()
    size = 0

    def sink(data: bytes | memoryview) -> None:
        nonlocal size
        hasher.update(data)
        size += len(data)

    try:
        await store.get_object(obj.key, obj.etag or None, sink)
    except S3Error as exc:
        log.warning("%s: could not read it to compare (%s); content unknown", obj.key, exc)
        return obj
    if size != obj.size:
        return obj  # another version than the listed one: leave it to the transfer's checks
    return replace(obj, hash=hasher.hexdigest())
