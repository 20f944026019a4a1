"""Backups and history of syncs (issue 14): the edges. Decisions are in sidecar/core/backup.py.

- RemoteBackup: before a finalize (or an undo) replaces or deletes an object, its current
  version is kept: a server-side copy under `<prefix>.netvol/backup/<sync id>/<path>`
  conditional on the ETag being replaced, or, in a versioned bucket, the id of the version
  being replaced (one HEAD pinned to that ETag). Then the write goes ahead.
- LocalBackup: a file a pull replaces or deletes is renamed into
  `<state folder>/backup/<sync id>/<path>` (a copy, under a size cap, when the state folder
  is on another filesystem).
- Each keeps what its sync did (`done`) in a RecordSpool: the entries of the sync's history
  record (sidecar/engine/history.py writes and reads records).
- Pruning: expired backups and records (by the time in their sync id) are removed at the end
  of a sync, at most PRUNE_PER_SYNC of them each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sidecar.core.backup import (
    BACKUP_DIR,
    HISTORY_DIR,
    RECORD_SUFFIX,
    BackupMode,
    Entry,
    Version,
    backup_key,
    sync_id_time,
)
from sidecar.core.model import Action, BaseEntry, LocalFile
from sidecar.engine.history import RecordSpool
from sidecar.s3 import S3Error, Store, read_labels

log = logging.getLogger("sidecar.backup")  # logger name kept from before the move

PRUNE_PER_SYNC = 200  # expired backup objects or files removed at the end of one sync
LOCAL_COPY_CAP = 64 * 1024**2  # state folder on another filesystem: copy only smaller files
CHANGED_IN_BUCKET = (
    "the object changed in the bucket during this finalize (precondition failed); nothing "
    "was overwritten: run pull, then finalize again"
)


class BackupFailed(Exception):
    """The version in the way could not be kept: the write that would replace it must not
    happen. The message names the path and the cause."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


async def resolve_mode(store: Store, mode: BackupMode) -> BackupMode:
    """auto: versions when the bucket has versioning enabled, else copy. A server that cannot
    say (rclone answers no versioning) gets copies."""
    mode = BackupMode(mode)
    if mode is not BackupMode.AUTO:
        return mode
    try:
        status = await store.bucket_versioning()
    except S3Error as exc:
        log.info("bucket versioning unknown (%s); backups are copies", exc.message)
        return BackupMode.COPY
    return BackupMode.VERSIONS if status == "Enabled" else BackupMode.COPY


class RemoteBackup:
    """Keeps what one sync replaces or deletes in the bucket, and what the sync did.

    `mode` may be AUTO: it is resolved (one GetBucketVersioning, through `resolve`, which
    the engine caches) at the first object to keep, so a sync that replaces nothing sends
    no request for it."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        mode: BackupMode,
        sync_id: str,
        spool: RecordSpool,
        resolve: Callable[[], Awaitable[BackupMode]] | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.mode = BackupMode(mode)
        self.sync_id = sync_id
        self.entries = spool
        self._before: dict[str, Version] = {}
        self._resolve = resolve or (lambda: resolve_mode(store, BackupMode.AUTO))
        # The transfers that replace objects start together: one of them asks, the rest wait
        # for its answer (not one GetBucketVersioning each).
        self._resolving = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self.mode is not BackupMode.OFF

    async def keep(
        self, path: str, key: str, etag: str, size: int, hash_: str = "", executable: bool = False
    ) -> Version | None:
        """Keep the object at `key` while it is the version with `etag`; raises BackupFailed
        (precondition: the object changed meanwhile) and never lets a caller go on to write."""
        if self.mode is BackupMode.AUTO:
            async with self._resolving:
                if self.mode is BackupMode.AUTO:
                    self.mode = await self._resolve()
        if not self.active:
            return None
        try:
            if self.mode is BackupMode.VERSIONS:
                info, version_id = await self.store.head_version(key, if_match=etag or None)
                if version_id:
                    known = hash_ or read_labels(info.metadata).hash or ""
                    kept = Version(size, known, etag, executable, version_id=version_id)
                    self._before[path] = kept
                    return kept
                log.info("%s: no version id on HEAD; keeping a copy instead", key)
            dest = backup_key(self.prefix, self.sync_id, path)
            written = await self.store.copy_object(key, dest, if_match=etag or None, size=size)
        except S3Error as exc:
            if exc.precondition_failed:
                raise BackupFailed(path, CHANGED_IN_BUCKET) from None
            if exc.not_found:
                raise BackupFailed(
                    path, "the object was deleted in the bucket during this finalize"
                ) from None
            raise BackupFailed(
                path, f"not replaced: could not keep a backup of it first ({exc.message})"
            ) from None
        if etag and "-" not in etag and written.etag and written.etag != etag:
            # The server ignored the copy's condition (moto) and copied another writer's
            # version: not filed under this sync (nothing of ours replaces it), and the
            # write is not made.
            with contextlib.suppress(S3Error):
                await self.store.delete(dest)
            raise BackupFailed(path, CHANGED_IN_BUCKET)
        kept = Version(size, hash_, etag, executable, key=dest)
        self._before[path] = kept
        return kept

    async def keep_action(self, action: Action, base: BaseEntry | None) -> None:
        """Before an upload over, or a delete of, the object the plan saw."""
        remote = action.remote
        if remote is None:
            return
        if base is not None and remote.etag in base.etags:
            known, executable = remote.hash or base.hash, base.executable
        else:
            known, executable = remote.hash or "", bool(remote.executable)
        await self.keep(action.path, remote.key, remote.etag, remote.size, known, executable)

    def done(self, path: str, after: Version | None) -> None:
        """The write happened: the path now holds `after` (None: deleted)."""
        self.entries.add(Entry(path, self._before.pop(path, None), after))


class LocalBackup:
    """Keeps local files one pull replaces or deletes, in <state folder>/backup/<sync id>/."""

    def __init__(self, root: Path, sync_id: str, same_filesystem: bool, spool: RecordSpool) -> None:
        self.root = root
        self.sync_id = sync_id
        self.same_filesystem = same_filesystem
        self.entries = spool
        self._before: dict[str, Version] = {}

    def keep(self, relpath: str, dir_fd: int, name: str, local: LocalFile | None) -> bool:
        """Move the file `name` (in dir_fd) aside. True when it is gone from the folder (the
        caller then has nothing to remove); False when the caller still has to (a copy was
        kept, or none could be)."""
        dest = self.root / self.sync_id / relpath
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("%s: no local backup (cannot create %s: %s)", relpath, dest.parent, exc)
            return False
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        version = Version(
            st.st_size,
            local.hash if local is not None else "",
            executable=bool(st.st_mode & 0o100),
            local=f"{self.sync_id}/{relpath}",
        )
        if self.same_filesystem:
            try:
                os.rename(name, dest, src_dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    log.warning("%s: no local backup (%s)", relpath, exc.strerror)
                    return False
            else:
                self._before[relpath] = version
                return True
        if st.st_size > LOCAL_COPY_CAP:
            log.warning(
                "%s: no local backup: %d bytes, above the copy cap for a state folder on "
                "another filesystem",
                relpath,
                st.st_size,
            )
            return False
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as source, open(dest, "wb") as target:
                shutil.copyfileobj(source, target)
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.chmod(dest, st.st_mode & 0o777)
        except OSError as exc:
            log.warning("%s: no local backup (%s)", relpath, exc.strerror)
            return False
        self._before[relpath] = version
        return False

    def done(self, path: str, after: Version | None) -> None:
        self.entries.add(Entry(path, self._before.pop(path, None), after))


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


class Pruner:
    """Expired backups and records, seen in the sync's own listing (no extra request) and in
    the state folder; removed at the end of a sync, at most PRUNE_PER_SYNC each time. A large
    listing does not descend into .netvol/ (`missed`): then its oldest keys are listed here,
    up to the first that has not expired (sync ids sort by time)."""

    def __init__(self, prefix: str, retention: float, now: datetime | None = None) -> None:
        self.prefix = prefix
        self.cutoff = (now or datetime.now(UTC)) - timedelta(seconds=retention)
        self.expired_keys: list[str] = []
        self.missed = False  # the sync's listing skipped .netvol/

    def expired(self, sync_id: str) -> bool:
        moment = sync_id_time(sync_id)
        return moment is not None and moment < self.cutoff

    def saw(self, relpath: str) -> bool:
        """A listed key under .netvol/ (relative to the prefix); False once the keys met are
        no longer expired (or enough are) in a listing of backup/ or history/."""
        if len(self.expired_keys) >= PRUNE_PER_SYNC:
            return False
        for top in (BACKUP_DIR, HISTORY_DIR):
            if relpath.startswith(top):
                sync_id = relpath[len(top) :].split("/", 1)[0].removesuffix(RECORD_SUFFIX)
                if not self.expired(sync_id):
                    return False
                if self.prefix + relpath not in self.expired_keys:
                    self.expired_keys.append(self.prefix + relpath)
                return True
        return True

    async def find_missed(self, store: Store) -> None:
        if not self.missed:
            return
        for top in (BACKUP_DIR, HISTORY_DIR):
            async with contextlib.aclosing(store.list(self.prefix + top)) as pages:
                async for page in pages:
                    start = len(self.prefix)
                    if not all(self.saw(item.key[start:]) for item in page):
                        break

    async def prune_remote(self, store: Store) -> int:
        try:
            await self.find_missed(store)
        except S3Error as exc:
            log.warning("could not list the expired backups: %s", exc.message)
        removed = 0
        for key in self.expired_keys:
            try:
                await store.delete(key)
            except S3Error as exc:
                log.warning("could not remove expired backup %s: %s", key, exc.message)
                continue
            removed += 1
        return removed

    def prune_local(self, state_folder: Path) -> int:
        """Expired local backups and records, oldest first, at most PRUNE_PER_SYNC files."""
        budget = PRUNE_PER_SYNC
        backups = state_folder / "backup"
        for sync_id in sorted(_names(backups)):
            if not self.expired(sync_id) or budget <= 0:
                break
            budget -= _remove_tree(backups / sync_id, budget)
        history = state_folder / "history"
        for name in sorted(_names(history)):
            if budget <= 0 or not self.expired(name.removesuffix(RECORD_SUFFIX)):
                break
            with contextlib.suppress(OSError):
                (history / name).unlink()
                budget -= 1
        return PRUNE_PER_SYNC - budget


def _names(folder: Path) -> Iterable[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _remove_tree(folder: Path, budget: int) -> int:
    """Remove up to `budget` files under folder (and the folders emptied); returns how many."""
    removed = 0
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if removed >= budget:
                return removed
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, name))
                removed += 1
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(folder)
    return removed
