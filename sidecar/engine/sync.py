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
import shutil
import sqlite3
import stat
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
)
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.core.agreement import agreed
from sidecar.core.backup import (
    BackupMode,
    UndoReport,
    new_sync_id,
)
from sidecar.core.filters import SYNCIGNORE, SYNCIGNORE_MAX_BYTES, PathFilter, parse_syncignore
from sidecar.core.model import (
    Direction,
    FileError,
    RemoteObject,
)
from sidecar.core.options import SyncConfig
from sidecar.core.phases import (
    TRANSFER_KINDS,
    action_bytes,
)
from sidecar.core.planner import DeletePolicy, finish
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult
from sidecar.core.shard import ShardFilter, temp_tag
from sidecar.core.units import format_bytes
from sidecar.engine.backup import (
    LOCAL_COPY_CAP,
    LocalBackup,
    Pruner,
    RemoteBackup,
    resolve_mode,
    same_filesystem,
)
from sidecar.engine.execute import DownloadOrder, Execution
from sidecar.engine.fatal import FatalSync
from sidecar.engine.history import History, RecordSpool, record_header
from sidecar.engine.limits import LimitedStore, Limits
from sidecar.engine.lock import LockBusy, SyncLock
from sidecar.engine.spool import PlanSpool
from sidecar.engine.state import StateError, StateStore, state_path_for
from sidecar.engine.threads import SettlingExecutor, default_io_threads
from sidecar.engine.transfer import Settings, Transfers, gather_or_cancel
from sidecar.engine.walk import Seen, StreamedWalk
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
        if self.state.sending:
            await self._settle_pending_writes(store, path_filter)
        # The scan and the listing stream into the planner's walk: no map of either side;
        # and the plan goes to a spool on disk as it is decided (a dry run's is the user's
        # list: kept in memory).
        spool = None if dry_run else self._open_spool()
        try:
            walk = StreamedWalk(
                config,
                self.state,
                store,
                self._executor,
                self._saw_bookkeeping,
                self._listing_skipped,
                progress,
            )
            seen = await walk.run(direction, path_filter, spool)
            progress.phase = "planning"
            self._planned(seen, syncignore_unusable, spool, result)
            if spool is None:
                return
            backup = await self._carry_out(store, direction, seen, spool, progress, result)
        except sqlite3.Error as exc:
            raise FatalSync(f"in the state folder {self.state.directory}: {exc}") from None
        finally:
            if spool is not None:
                spool.close()
        progress.phase = "committing"
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.state.commit)
            await self._finish_backup(store, direction, backup, result)
        finally:
            if backup is not None:
                backup.entries.close()

    def _open_spool(self) -> PlanSpool:
        try:
            return PlanSpool(self.state.directory)
        except (sqlite3.Error, OSError) as exc:
            raise FatalSync(
                f"cannot write the plan in the state folder {self.state.directory}: {exc}"
            ) from None

    def _planned(
        self,
        seen: Seen,
        syncignore_unusable: list[FileError],
        spool: PlanSpool | None,
        result: SyncResult,
    ) -> None:
        """The rules over the whole plan (once every path is decided), into the result; a
        dry run's plan, as the user's list."""
        config = self.config
        if config.shard is not None and (limit := seen.tally.volume.limit(config.shard.count)):
            result.notes.append(limit.message())
            log.warning("shard %s: %s", config.shard, limit.message())
        # Without the patterns of an unusable .syncignore, paths it hid are visible: never
        # delete on that view.
        input_errors = syncignore_unusable + seen.errors
        policy = DeletePolicy(
            allowed=not input_errors,
            why_not="the scan, listing or .syncignore had errors (see errors)",
            max_fraction=config.max_delete_fraction,
            force=config.force_delete,
        )
        the_plan = finish(seen.walk, policy)
        result.errors.extend(input_errors + the_plan.errors)
        result.conflicts.extend(the_plan.conflicts)
        result.files_skipped = the_plan.skipped
        result.deletes_blocked = the_plan.deletes_blocked
        if spool is None:  # a dry run: the plan is the user's list
            result.planned = list(the_plan.actions)
            result.files_transferred = sum(1 for a in the_plan.actions if a.kind in TRANSFER_KINDS)
            result.bytes_transferred = sum(action_bytes(a) for a in the_plan.actions)

    async def _carry_out(
        self,
        store: Store,
        direction: Direction,
        seen: Seen,
        spool: PlanSpool,
        progress: Progress,
        result: SyncResult,
    ) -> RemoteBackup | LocalBackup | None:
        """The spooled plan, read back through the rules over the whole plan: the free
        space first (nothing moves before it is known to fit), then the phases."""
        walk = seen.walk
        assert walk.rules is not None
        spool.keeps = walk.rules.keeps
        dropped = walk.rules.dropped  # writes a file/folder clash refused
        counts = spool.counts
        if direction is Direction.PULL:
            self._check_free_space(counts.download_bytes - sum(dropped.values()))
        files = counts.transfers - len(dropped)
        nbytes = counts.transfer_bytes - sum(dropped.values())

        progress.phase = "transferring"
        try:
            transfers = self._transfers(store, progress, walk.taken)
        except OSError as exc:
            raise FatalSync(f"cannot open local folder {self.config.local_dir}: {exc}") from None
        backup = await self._start_backup(store, direction, transfers, result)
        try:
            execution = Execution(
                self.state,
                transfers,
                progress,
                result,
                backup,
                workers=self.config.files_in_flight,
                order=self.download_order,
                hashed_at=seen.hashed_at,
            )
            await execution.run(spool, files, nbytes)
            await transfers.durable.flush()
        except BaseException:
            transfers.durable.flush_now()  # what is on disk gets its records, even now
            if backup is not None:
                backup.entries.close()  # an interrupted sync writes no record
            raise
        finally:
            transfers.close()
        return backup

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
            spool = RecordSpool(self.state.directory)
            local = LocalBackup(root, result.sync_id, self.local_backup_renames(), spool)
            transfers.keep_local = local.keep
            return local
        mode = self._backup_mode or self.config.backup
        return RemoteBackup(
            store,
            self.config.prefix,
            mode,
            result.sync_id,
            RecordSpool(self.state.directory),
            self.remote_backup_mode,
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
        spool = backup.entries
        if spool:
            side = "local" if direction is Direction.PULL else "remote"
            mode = "local" if isinstance(backup, LocalBackup) else str(backup.mode)
            header = record_header(
                backup.sync_id,
                str(direction),
                side,
                self.config.remote_url,
                str(self.config.local_dir),
                mode,
                spool.tally,
            )
            try:
                await History(store, self.config.prefix, self.state.directory).write(header, spool)
            except (S3Error, OSError, sqlite3.Error) as exc:
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

    async def _settle_pending_writes(self, store: Store, path_filter: PathFilter) -> None:
        """Writes a killed run sent without learning their outcome: where the object now
        holds exactly what was sent (our hash and mode in its metadata), it is our own write
        and becomes BASE, so an edit made since is not taken for a conflict with ourselves.
        One HEAD per such write (no listing needed: they are few), only after an interrupted
        run. BASE gets no LastModified here: the listing's form of it is learnt by the walk."""
        state = self.state
        prefix = self.config.prefix

        async def settle(path: str, size: int, digest: str, executable: bool) -> None:
            key = prefix + path
            try:
                info = await store.head(key)
            except S3Error as exc:
                if exc.not_found:
                    state.write_settled(path)  # it did not land, or was deleted since
                else:
                    log.warning("%s: HEAD failed (%s); will ask again next sync", key, exc)
                return
            labels = read_labels(info.metadata)
            if info.size == size and labels.hash == digest and labels.executable == executable:
                log.info("%s: the write an interrupted run sent had landed; recorded", key)
                state.set_base(
                    path, agreed(size, digest, executable, RemoteObject(key, size, info.etag))
                )
            else:
                state.write_settled(path)  # replaced since

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

    def _saw_bookkeeping(self, relpath: str) -> None:
        if self._pruner is not None:
            self._pruner.saw(relpath)  # .netvol/: never data

    def _listing_skipped(self, _sub_prefix: str) -> None:
        if self._pruner is not None:
            self._pruner.missed = True

    def _check_free_space(self, needed: int) -> None:
        """The pull's downloads, `needed` bytes in all, fit in the local folder's disk."""
        if not needed:
            return
        free = shutil.disk_usage(self.config.local_dir).free
        if needed > free:
            raise FatalSync(
                f"not enough space in {self.config.local_dir}: the pull needs "
                f"{format_bytes(needed)}, {format_bytes(free)} free; nothing was changed"
            )


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
