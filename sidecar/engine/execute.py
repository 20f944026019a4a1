"""Carry out a plan: each action kind to its handler, in the phases sidecar/core/phases.py
decides, storing the BASE entries sidecar/core/agreement.py decides. Nothing is decided here
but what the disk and the bucket answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sized
from dataclasses import replace
from functools import partial
from typing import Protocol, TypeVar

from sidecar.core.agreement import base_after, cache_entry, cacheable
from sidecar.core.backup import Version
from sidecar.core.model import Action, ActionKind, Conflict, Direction, FileError, LocalFile
from sidecar.core.phases import Phase, action_bytes, below_kept_file
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult
from sidecar.engine.backup import BackupFailed, LocalBackup, RemoteBackup
from sidecar.engine.spool import PlanSpool
from sidecar.engine.state import StateStore
from sidecar.engine.transfer import TransferError, Transfers, gather_or_cancel

T = TypeVar("T")


class DownloadOrder(Protocol):
    async def run(
        self,
        downloads: Iterable[Action],
        work: Callable[[Action], Awaitable[FileError | None]],
        workers: int,
    ) -> set[str]:
        """Carry out `work` for the downloads in its own order, `workers` at a time; the
        paths it left alone on purpose. `downloads` streams from the plan spool: the order
        keeps them on disk, not in a list (a million of them at a first pull)."""
        ...


class Execution:
    """One plan carried out against one sync's transfers; the outcome goes to `result`.

    `order`: a pull's downloads in another order than biggest first, drained by its own
    workers (the daemon's priority-ready pull, sidecar/daemon/pullqueue.py); None: biggest first.
    """

    def __init__(
        self,
        state: StateStore,
        transfers: Transfers,
        progress: Progress,
        result: SyncResult,
        backup: RemoteBackup | LocalBackup | None,
        *,
        workers: int,
        hashed_at: int,
        order: DownloadOrder | None = None,
    ) -> None:
        self.state = state
        self.transfers = transfers
        self.progress = progress
        self.result = result
        self.backup = backup
        self.remote_backup = backup if isinstance(backup, RemoteBackup) else None
        self.workers = workers
        self.order = order
        # The clock read before the scan hashed anything: no hash this run took is older, so
        # judging a transfer's file by it errs on the safe side (sidecar/core/agreement.racy).
        self.hashed_at = hashed_at
        self._known_conflicts: set[str] = set()

    async def run(self, plan: PlanSpool, files: int, nbytes: int) -> None:
        """The plan's phases one after the other, read back from the spool; `files` and
        `nbytes`: what its transfers move (the progress totals)."""
        self._count(files, nbytes)
        for action in plan.phase(Phase.IN_PLACE):
            self._in_place(action)
        kept_files = {a.path for a in plan.phase(Phase.DELETE) if not await self._delete(a)}
        moving = plan.phase(Phase.TRANSFER)  # biggest first
        if kept_files:  # deletes that did not happen: these stay files
            for action in plan.transfers_in_plan_order():
                error = below_kept_file(action, kept_files)
                if error is not None:
                    self.result.errors.append(error)
                    files, nbytes = files - 1, nbytes - action_bytes(action)
            self._count(files, nbytes)
            moving = (a for a in moving if below_kept_file(a, kept_files) is None)
        self._known_conflicts = {c.path for c in self.result.conflicts}
        await self._transfer(moving, files)

    def _count(self, files: int, nbytes: int) -> None:
        self.progress.files_total = files
        self.progress.bytes_total = nbytes

    # ---- phase 1: in place ------------------------------------------------------------
    def _in_place(self, action: Action) -> None:
        result = self.result
        if action.kind is ActionKind.FORGET:
            self.state.drop_base(action.path)
            return
        if action.kind is ActionKind.SET_MODE_LOCAL:
            try:
                if not self.transfers.set_mode_local(action):
                    return  # written to since the scan: the next pull sees it again
            except TransferError as exc:
                result.errors.append(exc.error)
                return
            result.files_transferred += 1  # the mode came over; no bytes had to
        else:
            result.files_adopted += 1
        self.state.set_base(action.path, base_after(action))

    # ---- phase 2: deletes ----------------------------------------------------------------
    async def _delete(self, action: Action) -> bool:
        """Whether the path is gone; False: it stays a file (the reason is in the result)."""
        try:
            if action.kind is ActionKind.DELETE_LOCAL:
                return await self._delete_local(action)
            await self._delete_remote(action)
            return True
        except BackupFailed as exc:
            self.result.errors.append(FileError(exc.path, exc.reason))
        except TransferError as exc:
            self.result.errors.append(exc.error)
        return False

    async def _delete_local(self, action: Action) -> bool:
        if not self.transfers.delete_local(action):
            self.result.conflicts.append(
                Conflict(
                    action.path,
                    "modified-deleted",
                    "kept the local file: it changed during the pull",
                )
            )
            return False
        # Dropped from BASE once the delete is on disk: a crash before that must not leave a
        # file that BASE says was deleted (it would be pushed as new, or its absence pushed as
        # a delete, wrongly).
        await self.transfers.durable.then(partial(self.state.drop_base, action.path))
        self._deleted(action)
        return True

    async def _delete_remote(self, action: Action) -> None:
        if self.remote_backup is not None:
            await self.remote_backup.keep_action(action, self.state.base.get(action.path))
        await self.transfers.delete_remote(action)
        self.state.drop_base(action.path)
        self._deleted(action)

    def _deleted(self, action: Action) -> None:
        if self.backup is not None:
            self.backup.done(action.path, None)
        self.result.files_deleted += 1

    # ---- phase 3: transfers --------------------------------------------------------------
    async def _transfer(self, queue: Iterator[Action], count: int) -> None:
        result = self.result
        if self.order is None or result.operation is not Direction.PULL or not count:
            await run_bounded(queue, self._transfer_one, self.workers)
            return
        # The daemon's priority order holds the downloads itself (sidecar/daemon/pullqueue.py).
        left_alone = await self.order.run(queue, self._transfer_one, self.workers)
        if left_alone:  # user files at paths still pending: kept, no conflict resolved yet
            result.conflicts = [c for c in result.conflicts if c.path not in left_alone]
            result.files_skipped += len(left_alone)
            self.progress.files_done += len(left_alone)

    async def _transfer_one(self, action: Action) -> FileError | None:
        error: FileError | None = None
        try:
            if action.kind is ActionKind.DOWNLOAD:
                await self._download(action)
            else:
                await self._upload(action)
        except TransferError as exc:
            error = exc.error
        except BackupFailed as exc:
            error = FileError(exc.path, exc.reason)
        finally:
            self.progress.files_done += 1
        if error is not None:
            self.result.errors.append(error)
        return error

    async def _download(self, action: Action) -> None:
        result, state = self.result, self.state
        done = await self.transfers.download(action)
        entry = base_after(action, done.local, (done.etag,))

        def record(path: str = action.path, local: LocalFile = done.local) -> None:
            state.set_base(path, entry)
            self._cache(path, local)

        # BASE claims the file only once its bytes and its name are on disk.
        await self.transfers.durable.then(record)
        if done.equal_already:
            result.files_adopted += 1
            return
        if self.backup is not None:
            self.backup.done(action.path, _version_of(done.local, done.etag))
        if done.conflict_copy and action.path not in self._known_conflicts:
            result.conflicts.append(
                Conflict(
                    action.path,
                    "both-modified",
                    "the local file changed during the pull; it was kept as the copy",
                    done.conflict_copy,
                )
            )
        else:
            _copy_kept_at(result, action, done.conflict_copy)
        result.files_transferred += 1
        result.bytes_transferred += done.local.size

    def _cache(self, path: str, local: LocalFile) -> None:
        """The file's hash into the cache, or out of it when racy: the next scan hashes it."""
        if cacheable(local, self.hashed_at):
            self.state.set_hash(path, cache_entry(local))
        else:
            self.state.drop_hash(path)

    async def _upload(self, action: Action) -> None:
        """UPLOAD, or SET_MODE_REMOTE (the object's metadata rewritten in place)."""
        state, remote_backup = self.state, self.remote_backup
        uploading = action.kind is ActionKind.UPLOAD
        if uploading and remote_backup is not None:
            await remote_backup.keep_action(action, state.base.get(action.path))
        transfers = self.transfers
        up = await (transfers.upload(action) if uploading else transfers.set_mode_remote(action))
        if uploading and remote_backup is not None:
            remote_backup.done(action.path, _version_of(up.local, up.etags[0]))
        state.set_base(action.path, base_after(action, up.local, up.etags, up.written_at))
        self._cache(action.path, up.local)
        _copy_kept_at(self.result, action, up.conflict_copy)
        self.result.files_transferred += 1
        self.result.bytes_transferred += up.local.size if up.content_sent else 0


def _version_of(local: LocalFile, etag: str) -> Version:
    return Version(local.size, local.hash, etag, local.executable)


def _copy_kept_at(result: SyncResult, action: Action, copy: str | None) -> None:
    """The planned conflict copy's name was taken meanwhile: report where it really is."""
    if copy is None or copy == action.conflict_copy:
        return
    for index, conflict in enumerate(result.conflicts):
        if conflict.path == action.path and conflict.copy == action.conflict_copy:
            result.conflicts[index] = replace(conflict, copy=copy)


async def run_bounded(
    items: Iterable[T], work: Callable[[T], Awaitable[object]], workers: int
) -> None:
    """`workers` tasks draining one iterator: bounded tasks even for 100,000 files."""
    iterator = iter(items)
    if isinstance(items, Sized):
        workers = min(workers, len(items))

    async def worker() -> None:
        for item in iterator:
            await work(item)

    await gather_or_cancel([worker() for _ in range(workers)])
