"""One sync, start to end: scan + list + load BASE, plan, check space, transfer, commit BASE.

The only module that knows the order of the steps. Entered by `sidecar pull|finalize --once`
directly and by the daemon for every /pull and /finalize.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from sys import intern
from typing import Any, ClassVar

from sidecar.core.agreement import agreed, cache_entry, cache_holds, cacheable, learned
from sidecar.core.backup import (
    NETVOL_PREFIX,
    BackupMode,
    UndoReport,
    is_bookkeeping,
    new_sync_id,
)
from sidecar.core.filters import SYNCIGNORE, SYNCIGNORE_MAX_BYTES, PathFilter, parse_syncignore
from sidecar.core.merge import OutOfOrder, Triple
from sidecar.core.model import (
    UNHASHED,
    Action,
    ActionKind,
    BaseEntry,
    Direction,
    FileError,
    LocalFile,
    Plan,
    RemoteObject,
)
from sidecar.core.options import SyncConfig
from sidecar.core.paths import BadKey, folder_markers, key_to_relpath
from sidecar.core.phases import (
    TRANSFER_KINDS,
    action_bytes,
)
from sidecar.core.planner import DeletePolicy, Walk, finish, needs_remote_hash, triples
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult
from sidecar.core.shard import ShardFilter, SizeTally, temp_tag
from sidecar.core.units import format_bytes
from sidecar.engine.backup import (
    LOCAL_COPY_CAP,
    History,
    LocalBackup,
    Pruner,
    RemoteBackup,
    new_record,
    resolve_mode,
    same_filesystem,
)
from sidecar.engine.execute import DownloadOrder, Execution, run_bounded
from sidecar.engine.hashing import md5_file, new_content_hasher
from sidecar.engine.limits import LimitedStore, Limits
from sidecar.engine.lock import LockBusy, SyncLock
from sidecar.engine.scan import ScanResult, hash_files, scan
from sidecar.engine.state import StateError, StateStore, state_path_for
from sidecar.engine.threads import SettlingExecutor, default_io_threads
from sidecar.engine.transfer import Settings, Transfers, gather_or_cancel
from sidecar.s3 import (
    BucketOptions,
    ClientSettings,
    ObjectStore,
    S3Error,
    Store,
    credentials_fingerprint,
    read_labels,
)

log = logging.getLogger("sidecar.sync")  # logger name kept from before the move

_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(slots=True)
class _Held:
    """Paths of the planner's walk waiting for HEADs: the ones asked about and every path
    after the first of them (decided in key order once the answers are in)."""

    triples: list[Triple[LocalFile, RemoteObject, BaseEntry]] = field(default_factory=list)
    asking: list[str] = field(default_factory=list)

    # A batch of HEADs at a time (enough to keep --concurrency busy), and never more than
    # this many paths held: a first sync over a folder that has the data asks about each.
    ASK_BATCH: ClassVar[int] = 1024
    HOLD_MAX: ClassVar[int] = 8192

    def full(self) -> bool:
        return len(self.asking) >= self.ASK_BATCH or len(self.triples) >= self.HOLD_MAX


class FatalSync(Exception):
    """The sync cannot run at all; nothing was changed."""


@dataclass(slots=True)
class _Listing:
    objects: dict[str, RemoteObject] = field(default_factory=dict)
    errors: list[FileError] = field(default_factory=list)
    volume: SizeTally = field(default_factory=SizeTally)  # all shards' objects (--shard)


class SyncEngine:
    """Holds the S3 client and BASE for one (remote, local folder) pair.

    Usage:
        async with SyncEngine(config) as engine:
            result = await engine.run(Direction.PULL, progress=progress, dry_run=False)

    `run` never raises for sync failures: they are in SyncResult.fatal / .errors. One run at a
    time per engine (the daemon serialises). `in_flight` is the number of S3 requests now in
    flight; `retries_total` counts retried requests since the engine was created.
    """

    def __init__(self, config: SyncConfig, client: ClientSettings | None = None) -> None:
        self.config = config
        self.client_settings = client or ClientSettings(
            concurrency=config.concurrency,
            read_timeout=config.request_timeout,
            addressing_style=config.addressing_style,
            bucket_options=BucketOptions(
                storage_class=config.storage_class,
                requester_pays=config.requester_pays,
                expected_bucket_owner=config.expected_bucket_owner,
                sse=config.sse,
                sse_kms_key_id=config.sse_kms_key_id,
                sse_c_key_file=str(config.sse_c_key_file) if config.sse_c_key_file else None,
                no_sign_request=config.no_sign_request,
            ),
        )
        self.state = StateStore(
            state_path_for(
                config.state_dir,
                config.remote_url,
                config.local_dir,
                str(config.shard) if config.shard else None,
            ),
            config.remote_url,
            config.local_dir,
        )
        self._state_loaded = False
        # --bwlimit and --max-requests-per-second: one set per engine, i.e. per process (the
        # daemon and `--once` each run one engine), in front of every store call.
        self.limits = Limits.from_config(config)
        self._store: ObjectStore | None = None
        self._store_fingerprint: tuple[float, ...] = ()
        self._retries_before = 0
        # Hashing and bulk reads run here (--hash-threads).
        self._executor = SettlingExecutor(
            max_workers=config.hash_threads or default_io_threads(), thread_name_prefix="sidecar-io"
        )
        # A pull's downloads in another order than biggest first, drained by its own workers
        # (the daemon's priority-ready pull, sidecar/daemon/pullqueue.py); None: biggest first.
        self.download_order: DownloadOrder | None = None
        self._backup_mode: BackupMode | None = None  # --backup, auto resolved on first use
        self._pruner: Pruner | None = None  # of the running sync (sees .netvol/ listed)
        self._said_other_filesystem = False

    def fleet_status(self) -> dict[str, Any]:
        """Shard and limits of this process, and the time transfers waited on the limits."""
        shard = self.config.shard
        return self.limits.status(str(shard) if shard else None)

    @property
    def in_flight(self) -> int:
        return self._store.in_flight if self._store else 0

    @property
    def inflight_budget(self) -> dict[str, int]:
        """The store's in-flight budget (sidecar/s3/retry.py): current, max, in use, and
        throttled answers seen; before the first request, the budget a store starts with."""
        if self._store is None:
            return self.client_settings.fresh_budget().status()
        return self._store.budget.status()

    @property
    def retries_total(self) -> int:
        return self._retries_before + (self._store.retries if self._store else 0)

    async def __aenter__(self) -> SyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close_store()
        self.state.close_journal()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _close_store(self) -> None:
        if self._store is not None:
            self._retries_before += self._store.retries
            store, self._store = self._store, None
            await store.__aexit__(None, None, None)

    async def _get_store(self) -> Store:
        fingerprint = credentials_fingerprint()
        if self._store is not None and fingerprint != self._store_fingerprint:
            log.info("credentials file changed; reconnecting with the new keys")
            await self._close_store()
        if self._store is None:
            store = ObjectStore(self.config.bucket, self.client_settings)
            await store.__aenter__()
            self._store, self._store_fingerprint = store, fingerprint
        if self.limits.active:
            return LimitedStore(self._store, self.limits)
        return self._store

    async def run(
        self,
        direction: Direction,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> SyncResult:
        started = time.monotonic()
        progress = progress or Progress(str(direction), started)
        result = SyncResult(direction, dry_run=dry_run)
        result.shard = str(self.config.shard) if self.config.shard else None
        retries_at_start = self.retries_total
        try:
            async with self._exclusive(direction, dry_run):
                await self._run(direction, dry_run, progress, result)
        except FatalSync as exc:
            result.fatal = str(exc)
        except S3Error as exc:
            result.fatal = str(exc)
        except StateError as exc:
            result.fatal = str(exc)
        finally:
            self.state.close_journal()
            result.seconds = time.monotonic() - started
            result.retries = self.retries_total - retries_at_start
            progress.phase = "done"
        level = logging.INFO if result.ok else logging.ERROR
        log.log(level, result.one_line(), extra={"summary": result.as_dict()})
        return result

    # ---- undo, restore, history (issue 14; the work is in sidecar/engine/undo.py) --------------
    async def undo(self, sync_id: str, *, dry_run: bool = False, force: bool = False) -> UndoReport:
        from sidecar.engine import undo

        return await self._locked_undo(
            f"undo {sync_id}",
            dry_run,
            lambda: undo.undo(self, sync_id, dry_run=dry_run, force=force),
        )

    async def restore(
        self, path: str, at: datetime, *, local: bool = False, dry_run: bool = False
    ) -> UndoReport:
        from sidecar.engine import undo

        return await self._locked_undo(
            f"restore {path}",
            dry_run,
            lambda: undo.restore(self, path, at, local=local, dry_run=dry_run),
        )

    async def history(self, limit: int | None = None) -> tuple[list[Any], list[str]]:
        from sidecar.engine import undo

        return await undo.history(self, limit)

    async def _locked_undo(
        self, what: str, dry_run: bool, work: Callable[[], Awaitable[UndoReport]]
    ) -> UndoReport:
        """Under the same locks as a sync: never beside one."""
        try:
            async with self._exclusive(Direction.PULL, dry_run):
                report = await work()
        except (FatalSync, S3Error, StateError) as exc:
            report = UndoReport(what.split()[0], what.split(maxsplit=1)[1], dry_run=dry_run)
            report.fatal = str(exc)
        level = logging.INFO if report.ok else logging.ERROR
        log.log(level, report.one_line(), extra={"summary": report.as_dict()})
        return report

    async def store(self) -> Store:
        return await self._get_store()

    async def remote_backup_mode(self) -> BackupMode:
        if self._backup_mode is None:
            self._backup_mode = await resolve_mode(await self._get_store(), self.config.backup)
        return self._backup_mode

    async def commit_state(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.state.commit)

    @contextlib.asynccontextmanager
    async def _exclusive(self, direction: Direction, dry_run: bool) -> AsyncIterator[None]:
        """The whole sync under the state lock and the folder lock (sidecar/engine/lock.py), waiting
        up to --lock-timeout for another sync to end. The state is (re)loaded under the lock:
        another process may have synced since our last run (the daemon keeps BASE in memory)."""
        config = self.config
        lock = SyncLock(
            self.state.directory,
            config.local_dir,
            config.lock_timeout,
            share_folder=config.shard is not None,
        )
        try:
            await lock.acquire_state(str(direction))
            if not self._state_loaded or self.state.changed_on_disk():
                self.state.load()
                self._state_loaded = True
            self._prepare_local_dir(direction, dry_run)
            if config.local_dir.is_dir():  # a dry-run pull may have no folder yet
                await lock.acquire_folder()
        except LockBusy as exc:
            raise FatalSync(f"another sync is running: {exc}") from None
        except OSError as exc:
            lock.release()
            raise FatalSync(f"cannot lock the state or folder: {exc}") from None
        except BaseException:
            lock.release()
            raise
        try:
            yield
            await self._executor.settle()
        except BaseException:
            # A failed or cancelled sync's running threads (a commit, a rename) end under
            # its locks: the next sync must not start beside them (sidecar/engine/threads.py).
            await self._executor.settle(drop_queued=True)
            raise
        finally:
            self.state.close_journal()
            self.state.remember_disk()
            lock.release()

    # ---- the steps -------------------------------------------------------------------
    async def _run(
        self, direction: Direction, dry_run: bool, progress: Progress, result: SyncResult
    ) -> None:
        config = self.config
        store = await self._get_store()
        if not dry_run:
            await self._abort_leftover_uploads(store)
        self._pruner = Pruner(config.prefix, config.backup_retention)

        syncignore_text, syncignore_errors, syncignore_unusable = await self._read_syncignore()
        result.errors.extend(syncignore_errors)
        path_filter = ShardFilter(config.include, config.exclude, syncignore_text, config.shard)
        progress.phase = "scanning"
        scanned, listing = await asyncio.gather(
            self._scan(path_filter), self._list(store, path_filter)
        )
        if config.shard is not None and (limit := listing.volume.limit(config.shard.count)):
            result.notes.append(limit.message())
            log.warning("shard %s: %s", config.shard, limit.message())
        if self.state.sending:
            await self._settle_pending_writes(store, listing.objects, path_filter)
        base: Mapping[str, BaseEntry] = self.state.base
        if not all(map(path_filter.wants, base)):
            base = {p: e for p, e in base.items() if path_filter.wants(p)}
        # else BASE itself, not a copy of it (a million entries): what follows reads it, and
        # changes it only as state.set_base does anyway.
        del path_filter  # and with it its verdict of every path, no longer asked
        # Hashes only where a decision needs one: a file with no BASE entry and no object at
        # its path is sent whatever it holds, and its upload hashes the bytes it sends (a
        # first finalize of 5,000 small files read each one once instead of twice).
        hashed_at = time.time_ns()  # before any byte is read: the racy rule's clock
        await hash_files(
            config.local_dir,
            scanned,
            [
                path
                for path, file in scanned.files.items()
                if file.hash == UNHASHED and (path in base or path in listing.objects)
            ],
            self._executor,
        )
        if not cache_holds(self.state.hash_cache, scanned.files, hashed_at):
            self.state.replace_hash_cache(
                {p: cache_entry(f) for p, f in scanned.files.items() if cacheable(f, hashed_at)}
            )
        remote = listing.objects  # HEADs update it in place (_ask_bucket)

        progress.phase = "planning"
        # Without the patterns of an unusable .syncignore, paths it hid are visible: never
        # delete on that view.
        input_errors = syncignore_unusable + scanned.errors + listing.errors
        policy = DeletePolicy(
            allowed=not input_errors,
            why_not="the scan, listing or .syncignore had errors (see errors)",
            max_fraction=config.max_delete_fraction,
            force=config.force_delete,
        )
        walk, the_plan = await self._plan(store, direction, scanned.files, remote, base, policy)
        result.errors.extend(input_errors + the_plan.errors)
        result.conflicts.extend(the_plan.conflicts)
        result.files_skipped = the_plan.skipped
        result.deletes_blocked = the_plan.deletes_blocked
        if dry_run:
            result.planned = list(the_plan.actions)
            result.files_transferred = sum(1 for a in the_plan.actions if a.kind in TRANSFER_KINDS)
            result.bytes_transferred = sum(action_bytes(a) for a in the_plan.actions)
            return
        if direction is Direction.PULL:
            self._check_free_space(the_plan.of_kind(ActionKind.DOWNLOAD))

        progress.phase = "transferring"
        try:
            transfers = self._transfers(store, progress, walk.taken)
        except OSError as exc:
            raise FatalSync(f"cannot open local folder {config.local_dir}: {exc}") from None
        backup = await self._start_backup(store, direction, transfers, result)
        try:
            await self._execute(
                the_plan.actions, transfers, progress, result, backup, hashed_at=hashed_at
            )
            await transfers.durable.flush()
        except BaseException:
            transfers.durable.flush_now()  # what is on disk gets its records, even now
            raise
        finally:
            transfers.close()
        progress.phase = "committing"
        await asyncio.get_running_loop().run_in_executor(self._executor, self.state.commit)
        await self._finish_backup(store, direction, backup, result)

    async def _start_backup(
        self,
        store: Store,
        direction: Direction,
        transfers: Transfers,
        result: SyncResult,
    ) -> RemoteBackup | LocalBackup | None:
        """This sync's id and what keeps the versions it replaces or deletes (--backup)."""
        if self.config.backup == BackupMode.OFF:
            return None
        result.sync_id = new_sync_id(datetime.now(UTC))
        if direction is Direction.PULL:
            root = self.state.directory / "backup"
            local = LocalBackup(root, result.sync_id, self.local_backup_renames())
            transfers.keep_local = local.keep
            return local
        mode = self._backup_mode or self.config.backup
        return RemoteBackup(
            store, self.config.prefix, mode, result.sync_id, self.remote_backup_mode
        )

    def local_backup_renames(self) -> bool:
        """Whether local backups are renames (the state folder is on the folder's
        filesystem); said once, at the first pull, when they are not."""
        same = same_filesystem(self.state.directory, self.config.local_dir)
        if not same and not self._said_other_filesystem:
            self._said_other_filesystem = True
            log.warning(
                "state folder %s is on another filesystem than %s: a pull keeps copies of "
                "the files it replaces or deletes only below %s each",
                self.state.directory,
                self.config.local_dir,
                format_bytes(LOCAL_COPY_CAP),
            )
        return same

    async def _finish_backup(
        self,
        store: Store,
        direction: Direction,
        backup: RemoteBackup | LocalBackup | None,
        result: SyncResult,
    ) -> None:
        """The history record of a sync that changed something, then expired backups."""
        if backup is None:
            return
        if backup.entries:
            side = "local" if direction is Direction.PULL else "remote"
            mode = "local" if isinstance(backup, LocalBackup) else str(backup.mode)
            record = new_record(
                backup.sync_id,
                str(direction),
                side,
                self.config.remote_url,
                str(self.config.local_dir),
                mode,
                backup.entries,
            )
            try:
                await History(store, self.config.prefix, self.state.directory).write(record)
            except (S3Error, OSError) as exc:
                result.errors.append(
                    FileError(f".netvol/history/{backup.sync_id}", f"history not written: {exc}")
                )
        else:
            result.sync_id = None  # nothing changed: no record, nothing to undo
        pruner = self._pruner
        if pruner is not None:
            removed = await pruner.prune_remote(store)
            removed += await asyncio.get_running_loop().run_in_executor(
                self._executor, pruner.prune_local, self.state.directory
            )
            if removed:
                log.info("removed %d expired backup object(s) or file(s)", removed)

    def _transfers(
        self,
        store: Store,
        progress: Progress,
        names_in_use: Container[str],
    ) -> Transfers:
        config = self.config
        return Transfers(
            store,
            config.local_dir,
            config.prefix,
            Settings(config.part_size, config.multipart_threshold),
            self.state,
            self._executor,
            progress,
            # A conflict copy made during the transfers takes no name in use either, nor one
            # the plan chose (Walk.taken).
            names_in_use=names_in_use,
            temp_tag=temp_tag(config.shard),
        )

    def _prepare_local_dir(self, direction: Direction, dry_run: bool) -> None:
        local_dir = self.config.local_dir
        if direction is Direction.FINALIZE and self.config.no_sign_request:
            raise FatalSync(
                "finalize refused: --no-sign-request (SIDECAR_NO_SIGN_REQUEST) is for pulling "
                "public buckets; unsigned requests cannot write"
            )
        if local_dir.is_dir():
            return
        if local_dir.exists():
            raise FatalSync(f"local folder {local_dir} exists but is not a folder")
        if direction is Direction.FINALIZE:
            raise FatalSync(f"local folder {local_dir} does not exist; nothing to finalize")
        if not dry_run:
            try:
                local_dir.mkdir(parents=True, exist_ok=True)  # another sync may make it too
            except OSError as exc:
                raise FatalSync(f"cannot create local folder {local_dir}: {exc}") from None

    async def _read_syncignore(self) -> tuple[str, list[FileError], list[FileError]]:
        """The usable patterns of the folder's .syncignore; the lines skipped (errors); and
        why the whole file is unusable, if it is (an input error: the sync goes on without
        it and deletes nothing). Read in a thread: no file can stall the event loop."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(
                self._executor, read_syncignore, self.config.local_dir
            )
        except _UnusableSyncignore as exc:
            why = f"not used: {exc}; synced without its patterns, nothing deleted"
            return "", [], [FileError(SYNCIGNORE, why)]
        text, problems = parse_syncignore(data)
        return text, [FileError(SYNCIGNORE, problem) for problem in problems], []

    async def _settle_pending_writes(
        self, store: Store, remote: dict[str, RemoteObject], path_filter: PathFilter
    ) -> None:
        """Writes a killed run sent without learning their outcome: where the object now
        holds exactly what was sent (our hash and mode in its metadata), it is our own write
        and becomes BASE, so an edit made since is not taken for a conflict with ourselves.
        One HEAD per such write, only after an interrupted run."""
        state = self.state

        async def settle(path: str, size: int, digest: str, executable: bool) -> None:
            obj = remote.get(path)
            if obj is None or obj.size != size:
                state.write_settled(path)  # it did not land, or was replaced since
                return
            try:
                info = await store.head(obj.key)
            except S3Error as exc:
                log.warning("%s: HEAD failed (%s); will ask again next sync", obj.key, exc)
                return
            labels = read_labels(info.metadata)
            if labels.hash == digest and labels.executable == executable:
                log.info("%s: the write an interrupted run sent had landed; recorded", obj.key)
                state.set_base(path, agreed(size, digest, executable, obj))
            else:
                state.write_settled(path)

        await gather_or_cancel(
            [
                settle(path, *sent)
                for path, sent in list(state.sending.items())
                if path_filter.wants(path)
            ]
        )

    async def _abort_leftover_uploads(self, store: Store) -> None:
        """Multipart uploads a killed run started and never ended: abort, never orphan."""
        for upload_id, key in list(self.state.open_uploads.items()):
            try:
                await store.abort_multipart(key, upload_id)
                log.info(
                    "aborted multipart upload %s of %s left by an interrupted run", upload_id, key
                )
            except S3Error as exc:
                log.warning("could not abort leftover upload %s of %s: %s", upload_id, key, exc)
                continue
            self.state.upload_ended(upload_id)
        for key in sorted(self.state.creating):
            # A create whose id never reached the journal (killed, or its answer lost).
            try:
                aborted = await store.abort_strays(key)
            except S3Error as exc:
                log.warning("could not look for uploads of %s left behind: %s", key, exc)
                continue
            for upload_id in aborted:
                log.info(
                    "aborted multipart upload %s of %s left by an interrupted run", upload_id, key
                )
            self.state.upload_create_ended(key)

    async def _scan(self, path_filter: PathFilter) -> ScanResult:
        if not self.config.local_dir.is_dir():
            return ScanResult()  # dry-run pull into a folder that does not exist yet
        scanned = await scan(
            self.config.local_dir, path_filter, self.state.hash_cache, self._executor
        )
        if scanned.temps_removed:
            log.info("removed %d temp file(s) of an interrupted run", scanned.temps_removed)
        if scanned.symlinks_skipped:
            log.info("skipped %d symlink(s): symlinks are not synced", scanned.symlinks_skipped)
        if scanned.specials_skipped:
            log.info(
                "skipped %d special file(s) (FIFO, socket, device): only regular files are synced",
                scanned.specials_skipped,
            )
        return scanned

    async def _list(self, store: Store, path_filter: ShardFilter) -> _Listing:
        listing = _Listing()
        prefix = self.config.prefix
        known = len(self.state.base)
        try:
            # As many keys as the last sync saw: a large prefix lists one round trip sooner.
            # A first sync: every object listed is a download to come, its connection opened
            # while the listing goes on (only on a long link).
            # The fan-out leaves .netvol/ out (backups may outnumber the data); the pruner
            # then lists the oldest of them itself.
            pages = store.list(
                prefix,
                expect_keys=known,
                warm=not known,
                skip=frozenset({prefix + NETVOL_PREFIX}),
                skipped=self._listing_skipped,
            )
            async for page in pages:
                for item in page:
                    try:
                        relpath = key_to_relpath(prefix, item.key)
                    except BadKey as exc:
                        listing.errors.append(FileError(item.key, f"skipped: {exc}"))
                        continue
                    if relpath is not None and is_bookkeeping(relpath):
                        if self._pruner is not None:
                            self._pruner.saw(relpath)  # .netvol/: never data
                        continue
                    if relpath is None or not path_filter.wants_any_shard(relpath):
                        continue
                    listing.volume.add(relpath, item.size)
                    if not path_filter.wants(relpath):
                        continue
                    # Interned: one string per path, ETag and LastModified second, shared
                    # with the scan and BASE (about 200 bytes a file; see scan._walk).
                    listing.objects[intern(relpath)] = RemoteObject(
                        item.key, item.size, intern(item.etag), intern(item.last_modified)
                    )
        except S3Error as exc:
            if exc.fatal or exc.not_found:
                raise FatalSync(f"cannot list {self.config.remote_url}: {exc.message}") from None
            raise FatalSync(f"listing {self.config.remote_url} failed: {exc.message}") from None
        for path in folder_markers(listing.objects):
            del listing.objects[path]
        return listing

    def _listing_skipped(self, _sub_prefix: str) -> None:
        if self._pruner is not None:
            self._pruner.missed = True

    async def _plan(
        self,
        store: Store,
        direction: Direction,
        local: dict[str, LocalFile],
        remote: dict[str, RemoteObject],
        base: Mapping[str, BaseEntry],
        policy: DeletePolicy,
    ) -> tuple[Walk, Plan]:
        """The planner's walk, and in it what BASE learns from the listing and the HEADs a
        decision needs (planner.needs_remote_hash): one pass over BASE, each row read (and
        its ETags parsed) once; three passes cost ~10 us a file on a no-op."""
        try:
            walk = await self._walk(store, direction, local, remote, base, in_order=True)
        except OutOfOrder:
            # Again with every side sorted: the same decisions. What the first try learnt
            # and asked stays in BASE and `remote`.
            walk = await self._walk(store, direction, local, remote, base, in_order=False)
        return walk, finish(walk, policy)

    async def _walk(
        self,
        store: Store,
        direction: Direction,
        local: dict[str, LocalFile],
        remote: dict[str, RemoteObject],
        base: Mapping[str, BaseEntry],
        in_order: bool,
    ) -> Walk:
        """Every path decided in key order. A path whose decision waits for a HEAD holds the
        paths after it until a batch of HEADs is answered (a bounded number), so decisions
        (and the conflict copies they name) come in the same order as with no HEAD at all."""
        walk = Walk(direction, datetime.now(UTC), self._name_taken(remote))
        held = _Held()
        for t in triples(local, remote, base, in_order):
            if needs_remote_hash(t.local, t.remote, t.base):
                held.asking.append(t.path)
            elif not held.triples:
                self._decide(walk, t.path, t.local, t.remote, t.base)
                continue
            held.triples.append(t)
            if held.full():
                await self._decide_held(store, direction, walk, local, remote, held)
        await self._decide_held(store, direction, walk, local, remote, held)
        return walk

    async def _decide_held(
        self,
        store: Store,
        direction: Direction,
        walk: Walk,
        local: dict[str, LocalFile],
        remote: dict[str, RemoteObject],
        held: _Held,
    ) -> None:
        """Ask the bucket about the held paths that need it, then decide every held path in
        key order (and let them go)."""
        await self._ask_bucket(store, local, remote, held.asking, direction)
        for t in held.triples:
            # The listed object, or what the HEAD made of it (updated in place).
            ro = remote.get(t.path) if t.remote is not None else None
            self._decide(walk, t.path, t.local, ro, t.base)
        held.triples.clear()
        held.asking.clear()

    def _decide(
        self,
        walk: Walk,
        path: str,
        lf: LocalFile | None,
        ro: RemoteObject | None,
        be: BaseEntry | None,
    ) -> None:
        """Record what the listing teaches about this unchanged object (core.agreement),
        then plan the path on BASE as it now is."""
        if ro is not None and (entry := learned(be, ro)) is not None:
            self.state.set_base(path, entry)
            be = entry
        walk.decide(path, lf, ro, be)

    async def _ask_bucket(
        self,
        store: Store,
        local: Mapping[str, LocalFile],
        remote: dict[str, RemoteObject],
        wanted: list[str],
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

        async def resolve(path: str) -> None:
            obj = remote[path]
            try:
                info = await store.head(obj.key)
            except S3Error as exc:
                log.warning("%s: HEAD failed (%s); treating its content as unknown", obj.key, exc)
                return
            labels = read_labels(info.metadata)
            digest = labels.hash
            if digest:
                remote[path] = replace(obj, hash=digest, executable=labels.executable)
            elif path not in local:
                return  # asked for the mode and hash only (planner.needs_remote_hash)
            elif _PLAIN_MD5.match(obj.etag) and not info.etag_is_opaque:
                # A foreign single-part object: its ETag is the MD5 of its bytes.
                md5 = await asyncio.get_running_loop().run_in_executor(
                    self._executor, md5_file, self.config.local_dir / path
                )
                remote[path] = replace(obj, md5_matches_local=(md5 == obj.etag))
            elif direction is Direction.FINALIZE:
                remote[path] = await _hash_by_download(store, obj)

        # Updated in place: the listing's own map, which nothing reads after this (a copy
        # was a second map of every object, ~40 MiB at 1 M files, just for a few changes).
        # A bounded pool of workers, not a task per object: a first sync over a folder that
        # already holds the data asks for every object (~2 KiB a task at 100,000 files).
        await run_bounded(wanted, resolve, self.config.concurrency)  # a HEAD each

    def _name_taken(self, remote: Container[str]) -> Callable[[str], bool]:
        """Whether a conflict copy's name is in use: a local name (an lstat: conflicts are
        rare) or an object the listing showed. A copy's name taken after all is found by the
        transfer that makes it (a no-replace rename, a conditional copy) and the next one is
        taken."""
        root = str(self.config.local_dir)

        def taken(name: str) -> bool:
            if name in remote:
                return True
            try:
                os.lstat(f"{root}/{name}")
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError:
                return False  # cannot tell (e.g. no access): the transfer will find out
            return True

        return taken

    def _check_free_space(self, downloads: Iterable[Action]) -> None:
        needed = sum(a.remote.size for a in downloads if a.remote is not None)
        if not needed:
            return
        free = shutil.disk_usage(self.config.local_dir).free
        if needed > free:
            raise FatalSync(
                f"not enough space in {self.config.local_dir}: the pull needs "
                f"{format_bytes(needed)}, {format_bytes(free)} free; nothing was changed"
            )

    async def _execute(
        self,
        actions: list[Action],
        transfers: Transfers,
        progress: Progress,
        result: SyncResult,
        backup: RemoteBackup | LocalBackup | None = None,
        *,
        hashed_at: int,
    ) -> None:
        execution = Execution(
            self.state,
            transfers,
            progress,
            result,
            backup,
            workers=self.config.files_in_flight,
            order=self.download_order,
            hashed_at=hashed_at,
        )
        await execution.run(actions)


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


class _UnusableSyncignore(Exception):
    pass


def read_syncignore(folder: Path, name: str = SYNCIGNORE) -> bytes:
    """The bytes of folder/.syncignore (or `name`, e.g. .syncpriority; b"" when there is
    none), read only from a regular file of at most SYNCIGNORE_MAX_BYTES that is no symlink:
    a FIFO would block, a link to /dev/zero would never end, and a link out of the folder
    would read (and quote in errors) a file the user does not own here."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (fstat refuses it next).
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _UnusableSyncignore(
                "it is a symbolic link, which is never followed (make it a regular file)"
            ) from None
        raise _UnusableSyncignore(f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _UnusableSyncignore(f"it is a {_file_kind(st.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        # Bounded by the cap, not by st_size: the file may grow while we read.
        while chunk := os.read(fd, SYNCIGNORE_MAX_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > SYNCIGNORE_MAX_BYTES:
                raise _UnusableSyncignore(f"it is larger than {format_bytes(SYNCIGNORE_MAX_BYTES)}")
        return b"".join(chunks)
    except OSError as exc:
        raise _UnusableSyncignore(f"cannot read it: {exc.strerror}") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_IFDIR: "folder",
        stat.S_IFIFO: "FIFO (named pipe)",
        stat.S_IFCHR: "character device",
        stat.S_IFBLK: "block device",
        stat.S_IFSOCK: "socket",
    }
    return kinds.get(stat.S_IFMT(mode), "special file")
