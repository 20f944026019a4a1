"""The transfer engine: carries out one action of a plan against the bucket and the folder.

- Downloads land in a temp file beside the target, are verified against the object's xxh3
  metadata, get their mtime and mode, and are renamed into place: no half files, ever.
- Large files move as parallel parts sharing the store's request slots; upload parts also
  share a memory budget so RSS stays bounded whatever the file sizes.
- A local file that changes during its upload is detected (stat before/after) and retried;
  a multipart upload that cannot complete is aborted at once (registered on creation).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import stat as stat_mod
from collections.abc import AsyncIterator, Callable, Container, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from sidecar.core.model import UNHASHED, Action, FileError, LocalFile, RemoteObject, identity_of
from sidecar.core.parts import part_ranges, range_size_for
from sidecar.core.paths import NamesInUse, conflict_name, parent_dirs, temp_name
from sidecar.core.progress import Progress
from sidecar.engine.folder import (
    Durability,
    Folder,
    UnsafeFolder,
    lstat_at,
    rename_noreplace,
    same_file,
)
from sidecar.engine.hashing import (
    Hasher,
    content_hash_bytes,
    content_hash_fd,
    content_hash_file,
    new_content_hasher,
)
from sidecar.engine.state import StateStore
from sidecar.s3 import (
    S3Error,
    Store,
    Written,
    labels_for,
    read_labels,
)

log = logging.getLogger("sidecar.transfer")  # logger name kept from before the move
T = TypeVar("T")
Args = TypeVarTuple("Args")

CHANGED_IN_BUCKET = (
    "the object changed in the bucket during this finalize (precondition failed); nothing "
    "was overwritten: run pull, then finalize again"
)
RELABELLED = (
    "the object changed in the bucket during this finalize (the server ignored the copy's "
    "precondition): its new bytes were kept and our hash and mode taken off them again; "
    "run pull, then finalize again"
)
CHANGE_ATTEMPTS = 3
INLINE_READ_LIMIT = 256 * 1024  # smaller files are read on the loop; a thread hop costs more
PLACE_ATTEMPTS = 3  # a file the user keeps re-creating at the target while we place ours
COPY_NAME_ATTEMPTS = 20  # conflict-copy names taken by someone else meanwhile
HASH_SLICE = 256 * 1024  # a received range is written and hashed this much at a time
FOLDER_MOVED = "its folder was moved or replaced during the download; the file was not placed"


class TransferError(Exception):
    """One file failed; the message names the file and the cause."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.error = FileError(path, reason)


@dataclass(frozen=True, slots=True)
class Settings:
    part_size: int
    multipart_threshold: int
    # Part buffers, uploads and downloads alike: budget // part_size parts in flight. Measured
    # on LARGE pull: 4 x 16 MiB streams beat 16 x 4 MiB (1.12-1.18 s vs 1.48-1.61 s).
    part_memory_budget: int = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class Downloaded:
    local: LocalFile
    etag: str
    equal_already: bool = False  # a conflict download turned out to match the local file
    conflict_copy: str | None = None  # where a local version in the way was kept


@dataclass(frozen=True, slots=True)
class Uploaded:
    local: LocalFile
    etags: tuple[str, ...]
    content_sent: bool = True  # False: only the metadata was rewritten
    written_at: int = 0  # the server's clock when it answered (Written.at)
    conflict_copy: str | None = None  # where the bucket's version in the way was kept


def _current_umask() -> int:
    """The process umask, read without setting it where Linux allows (os.umask sets it,
    and a file another thread creates meanwhile would get mode 0o666)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _mode_for(executable: bool, umask: int) -> int:
    return (0o777 if executable else 0o666) & ~umask


def metadata_for(local: LocalFile) -> dict[str, str]:
    return labels_for(local.hash, local.mtime_ns, local.executable)


class Transfers:
    def __init__(
        self,
        store: Store,
        root: Path,
        prefix: str,
        settings: Settings,
        state: StateStore,
        executor: ThreadPoolExecutor,
        progress: Progress | None = None,
        names_in_use: Container[str] = (),
        temp_tag: str = "",
    ) -> None:
        self.store = store
        self.root = root
        self._root = str(root)
        self.folder = Folder(self._root)
        self.durable = Durability(executor)
        # Relative paths a conflict copy must not take (the scan and the listing).
        self.names_in_use = names_in_use
        self.temp_tag = temp_tag  # a sharded sync's mark on its temp files (ShardFilter)
        self._umask = _current_umask()
        self.prefix = prefix
        self.settings = settings
        self.state = state
        self.executor = executor
        self.progress = progress
        # At least two parts in flight, whatever the settings.
        budget = max(2 * settings.part_size, settings.part_memory_budget)
        self._part_buffers = BufferPool(settings.part_size, budget)
        # A pull's local backup (sidecar.engine.backup.LocalBackup.keep): moves a file it is
        # about to replace or delete aside; True when the file is gone from the folder.
        self.keep_local: Callable[[str, int, str, LocalFile | None], bool] | None = None

    def close(self) -> None:
        self.folder.close()

    # ---- helpers ---------------------------------------------------------------------
    def _abs(self, relpath: str) -> str:
        # Plain strings: a pathlib join per file cost more than the syscalls it feeds.
        return f"{self._root}/{relpath}"

    def _count(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.add_bytes(nbytes)

    async def _in_thread(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        return await finish_in_thread(self.executor, fn, *args)

    def _open_parent(self, relpath: str, create: bool) -> int:
        """An fd of relpath's folder, reached from the root without following a symlink."""
        try:
            return self.folder.open_dir(relpath.rpartition("/")[0], create)
        except UnsafeFolder as exc:
            raise TransferError(relpath, str(exc)) from None

    def _fresh_conflict_name(self, relpath: str, tried: Container[str] = ()) -> str:
        taken = NamesInUse(self.names_in_use, tried)
        return conflict_name(relpath, datetime.now(UTC), taken)

    # ---- download --------------------------------------------------------------------
    async def download(self, action: Action) -> Downloaded:
        """Every step relative to the fd of the file's folder: a folder renamed or swapped
        for a symlink meanwhile gives this file an error, never a write elsewhere."""
        relpath = action.path
        try:
            dir_fd = self._open_parent(relpath, create=True)
        except OSError as exc:
            raise TransferError(relpath, _os_reason("cannot create its folder", exc)) from None
        try:
            return await self._download_into(action, dir_fd)
        except OSError as exc:
            raise TransferError(relpath, _os_reason("cannot place the file", exc)) from None
        finally:
            os.close(dir_fd)

    async def _download_into(self, action: Action, dir_fd: int) -> Downloaded:
        remote = action.remote
        assert remote is not None
        relpath = action.path
        tmp = temp_name(self.temp_tag)
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise TransferError(relpath, _os_reason("cannot create a temp file", exc)) from None
        try:
            try:
                try:
                    if remote.size >= self.settings.multipart_threshold:
                        metadata, digest = await self._get_parallel(fd, remote)
                    else:
                        metadata, digest = await self._get_whole(fd, remote)
                except OSError as exc:
                    raise TransferError(relpath, _os_reason("cannot write", exc)) from None
                labels = read_labels(metadata)
                expected = labels.hash
                if expected and expected != digest:
                    raise TransferError(
                        relpath,
                        f"content hash mismatch after download (got {digest}, object says "
                        f"{expected}); the local file was left untouched",
                    )
                os.fchmod(fd, _mode_for(labels.executable, self._umask))
                if labels.mtime_ns is not None:
                    os.utime(fd, ns=(labels.mtime_ns, labels.mtime_ns))
                # The bytes reach the disk before the name does (and so before BASE).
                await self._in_thread(os.fsync, fd)
            finally:
                os.close(fd)
            return await self._place(action, dir_fd, tmp, digest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    async def _place(self, action: Action, dir_fd: int, tmp: str, digest: str) -> Downloaded:
        """Rename the verified temp file to the target: never over a version nobody kept."""
        remote = action.remote
        assert remote is not None
        relpath = action.path
        name = relpath.rpartition("/")[2]
        self._check_still_there(relpath, dir_fd)
        planned = action.local
        conflict_copy: str | None = None
        for _attempt in range(PLACE_ATTEMPTS):
            current = lstat_at(name, dir_fd)
            if current is None:
                try:
                    rename_noreplace(tmp, name, dir_fd)
                except FileExistsError:
                    continue  # a file appeared meanwhile: look at it first
                break
            if stat_mod.S_ISDIR(current.st_mode):
                raise TransferError(relpath, "is a folder here, the bucket has a file")
            changed_since_scan = planned is None or identity_of(current) != planned.identity
            if not action.keep_conflict_copy and not changed_since_scan:
                if self.keep_local is not None:
                    self.keep_local(relpath, dir_fd, name, planned)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # BASE's version
                break
            equal = await self._equal_in_place(action, dir_fd, name, current, digest)
            if equal is not None:
                os.unlink(tmp, dir_fd=dir_fd)  # equal after all: nothing to move, nothing to keep
                return Downloaded(equal, remote.etag, equal_already=True)
            # A local version is in the way (a conflict, or written during this pull):
            # keep it beside the new one, never overwrite it.
            conflict_copy = self._keep_aside(action, dir_fd, name)
            try:
                rename_noreplace(tmp, name, dir_fd)
            except FileExistsError:
                continue
            break
        else:
            raise TransferError(relpath, "kept being re-created while the download was placed")
        self.durable.changed(dir_fd)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        local = LocalFile.of(st, digest)
        return Downloaded(local, remote.etag, conflict_copy=conflict_copy)

    def _check_still_there(self, relpath: str, dir_fd: int) -> None:
        """The temp file's folder must still be where relpath leads: a folder renamed (or
        moved out of the volume) while the bytes came in gets no file."""
        try:
            here = self._open_parent(relpath, create=False)
        except (OSError, TransferError):
            raise TransferError(relpath, FOLDER_MOVED) from None
        try:
            if not same_file(os.fstat(here), os.fstat(dir_fd)):
                raise TransferError(relpath, FOLDER_MOVED)
        finally:
            os.close(here)

    async def _equal_in_place(
        self, action: Action, dir_fd: int, name: str, current: os.stat_result, digest: str
    ) -> LocalFile | None:
        """The file in the way as a LocalFile if it already holds the downloaded bytes."""
        planned = action.local
        if planned is not None and identity_of(current) == planned.identity:
            return planned if planned.hash == digest else None
        assert action.remote is not None
        if not stat_mod.S_ISREG(current.st_mode) or current.st_size != action.remote.size:
            return None
        # Written during this pull (another pull of the same bucket, a copy by hand): equal
        # bytes are not a conflict, so no copy is kept.
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            before = os.fstat(fd)
            if not same_file(before, current):
                return None
            found = str(await self._in_thread(content_hash_fd, fd))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if found != digest or identity_of(after) != identity_of(before):
            return None
        return LocalFile.of(after, digest)

    def _keep_aside(self, action: Action, dir_fd: int, name: str) -> str:
        """Move the file in the way to a conflict-copy name nobody has; returns its relpath."""
        copy = action.conflict_copy or self._fresh_conflict_name(action.path)
        tried: set[str] = set()
        for _attempt in range(COPY_NAME_ATTEMPTS):
            try:
                rename_noreplace(name, copy.rpartition("/")[2], dir_fd)
                return copy
            except FileExistsError:
                tried.add(copy)
                copy = self._fresh_conflict_name(action.path, tried)
        raise TransferError(action.path, "found no free name for the conflict copy")

    async def _get_whole(self, fd: int, remote: RemoteObject) -> tuple[dict[str, str], str]:
        """The object into fd from offset 0. A body cut mid-way is fetched again by the
        store's retry policy (the one policy of the wire); restart() starts the file over."""
        key = self.prefix + self._relpath_of(remote)
        hasher = new_content_hasher()
        written = 0

        def sink(data: bytes | memoryview) -> None:
            nonlocal written
            hasher.update(data)
            _pwrite_all(fd, data, written)
            written += len(data)
            self._count(len(data))

        def restart() -> None:
            nonlocal hasher, written
            self._count(-written)
            os.ftruncate(fd, 0)
            hasher, written = new_content_hasher(), 0

        try:
            metadata = await self.store.get_object(
                key, remote.etag or None, sink, restart, size=remote.size
            )
        except S3Error as exc:
            self._count(-written)
            raise TransferError(self._relpath_of(remote), exc.message) from None
        except OSError:  # the file, not the wire (reported by the caller)
            self._count(-written)
            raise
        if written != remote.size:
            # The object changed since the listing (a server that ignores If-Match).
            raise TransferError(
                self._relpath_of(remote),
                f"size changed during download ({remote.size} listed, {written} received)",
            )
        return metadata, hasher.hexdigest()

    async def _get_parallel(self, fd: int, remote: RemoteObject) -> tuple[dict[str, str], str]:
        """Ranges in parallel, each received straight into a buffer, written with one pwrite
        and hashed in order from memory: the file is never read back (re-reading 1 GiB to
        hash it cost ~0.18 s of CPU, an eighth of the pull).

        Workers take ranges in order and borrow buffers in that order (the pool is FIFO);
        a range keeps its buffer until the ranges before it are hashed, which always ends
        because each of those already holds a buffer.
        """
        relpath = self._relpath_of(remote)
        key = self.prefix + relpath
        os.ftruncate(fd, remote.size)
        pool = self._part_buffers
        pool.use_size(range_size_for(self.settings.part_size, pool.budget, self.store.round_trip))
        ranges = part_ranges(remote.size, pool.size)
        metadata: dict[str, str] = {}
        hasher = new_content_hasher()
        next_range = 0  # the next range a worker takes
        next_hash = 0  # the next range to hash
        waiting: dict[int, asyncio.Event] = {}

        async def fetch(offset: int, view: memoryview) -> dict[str, str]:
            try:  # a range cut mid-way is fetched again by the store's retry policy
                return await self.store.get_range_into(
                    key, offset, view, remote.etag or None, self._count
                )
            except S3Error as exc:
                raise TransferError(relpath, exc.message) from None

        async def worker() -> None:
            nonlocal next_range, next_hash
            while next_range < len(ranges):
                index = next_range
                next_range += 1
                offset, length = ranges[index]
                async with pool.borrow(length) as view:
                    metadata.update(await fetch(offset, view))
                    # Writing and hashing on the I/O threads (both release the GIL): the
                    # loop goes on receiving the other ranges meanwhile, on the other core.
                    if index == next_hash:  # its turn to be hashed: one hop does both
                        await self._in_thread(_pwrite_hashed, fd, view, offset, hasher)
                    else:
                        await self._in_thread(_pwrite_all, fd, view, offset)
                        if index != next_hash:
                            waiting[index] = asyncio.Event()
                            await waiting[index].wait()
                        await self._in_thread(hasher.update, view)
                    next_hash += 1
                    if next_hash in waiting:
                        waiting.pop(next_hash).set()

        workers = min(len(ranges), self.store.settings.concurrency)
        await gather_or_cancel([worker() for _ in range(workers)])
        return metadata, hasher.hexdigest()

    def _relpath_of(self, remote: RemoteObject) -> str:
        return remote.key[len(self.prefix) :]

    # ---- upload ----------------------------------------------------------------------
    async def upload(self, action: Action) -> Uploaded:
        local = action.local
        assert local is not None
        relpath = action.path
        key = self.prefix + relpath
        remote = action.remote
        conflict_copy: str | None = None
        if action.keep_conflict_copy and remote is not None and action.conflict_copy:
            conflict_copy = await self._copy_aside(action, remote)
        if_match = remote.etag if remote is not None else None
        for _attempt in range(CHANGE_ATTEMPTS):
            local = await self._current(relpath, local)
            try:
                if local.size < self.settings.multipart_threshold:
                    result = await self._put_whole(relpath, key, local, if_match)
                else:
                    result = await self._put_parts(relpath, key, local, if_match)
            except S3Error as exc:
                if exc.precondition_failed:
                    raise TransferError(relpath, CHANGED_IN_BUCKET) from None
                raise TransferError(relpath, exc.message) from None
            if result is not None:
                return replace(result, conflict_copy=conflict_copy) if conflict_copy else result
            log.info("%s changed while uploading; trying again", relpath)
        raise TransferError(
            relpath, f"kept changing while being uploaded ({CHANGE_ATTEMPTS} tries); not sent"
        )

    async def _copy_aside(self, action: Action, remote: RemoteObject) -> str:
        """Copy the bucket's version in the way to a conflict key no object has: the copy is
        conditional (If-None-Match), and a taken name means the next one."""
        assert action.conflict_copy is not None
        copy, tried = action.conflict_copy, set[str]()
        for _attempt in range(COPY_NAME_ATTEMPTS):
            dest = self.prefix + copy
            try:
                await self.store.copy(remote.key, dest, remote.etag, if_none_match=True)
                return copy
            except S3Error as exc:
                if not exc.precondition_failed or not await self._exists(dest):
                    # The source changed (its If-Match failed), or another failure.
                    raise TransferError(
                        action.path,
                        f"could not keep the bucket's version as a copy: {exc.message}",
                    ) from None
            tried.add(copy)
            copy = self._fresh_conflict_name(action.path, tried)
        raise TransferError(action.path, "found no free key for the conflict copy")

    async def _exists(self, key: str) -> bool:
        try:
            await self.store.head(key)
        except S3Error as exc:
            if exc.not_found:
                return False
            raise TransferError(key, exc.message) from None
        return True

    async def _current(self, relpath: str, planned: LocalFile) -> LocalFile:
        """The file as it is now: `planned` if its stat did not change since the scan, else
        the new stat. A multipart upload also needs the hash first (it goes in the metadata
        at the start); a whole-object upload hashes the bytes it sends instead."""
        path = self._abs(relpath)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TransferError(relpath, _os_reason("cannot read", exc)) from None
        local = planned if identity_of(st) == planned.identity else LocalFile.of(st, UNHASHED)
        if local.size < self.settings.multipart_threshold or local.hash:
            return local
        try:
            digest = str(await self._in_thread(content_hash_file, path))
        except OSError as exc:
            raise TransferError(relpath, _os_reason("cannot read", exc)) from None
        # Hashed after the stat: a change during hashing shows as a new stat before Complete.
        return replace(local, hash=digest)

    def _unchanged(self, relpath: str, local: LocalFile) -> bool:
        try:
            return identity_of(os.stat(self._abs(relpath))) == local.identity
        except OSError:
            return False

    async def _put_whole(
        self, relpath: str, key: str, local: LocalFile, if_match: str | None
    ) -> Uploaded | None:
        if local.size <= INLINE_READ_LIMIT:
            try:
                data = _read_file(self._abs(relpath))
            except OSError as exc:
                raise TransferError(relpath, _os_reason("cannot read", exc)) from None
            return await self._send_whole(relpath, key, local, if_match, data)
        # Larger bodies share the transfer memory budget with parts: --concurrency whole-file
        # PUTs of up to --multipart-threshold bytes each would otherwise all sit in memory.
        async with self._part_buffers.borrow(local.size) as buffer:
            try:
                count = await self._in_thread(_read_into, self._abs(relpath), buffer)
            except OSError as exc:
                raise TransferError(relpath, _os_reason("cannot read", exc)) from None
            return await self._send_whole(relpath, key, local, if_match, buffer[:count])

    async def _send_whole(
        self,
        relpath: str,
        key: str,
        local: LocalFile,
        if_match: str | None,
        data: bytes | memoryview,
    ) -> Uploaded | None:
        if len(data) != local.size or not self._unchanged(relpath, local):
            return None
        # The bytes we send define the hash we store: never a hash of some other version.
        local = LocalFile(
            local.size, local.mtime_ns, local.inode, local.executable, content_hash_bytes(data)
        )
        self.state.write_sending(relpath, local.size, local.hash, local.executable)
        written = await self.store.put(
            key, data, metadata_for(local), if_match=if_match, if_none_match=if_match is None
        )
        self._count(len(data))
        return Uploaded(local, (written.etag,), written_at=written.at)

    async def _put_parts(
        self, relpath: str, key: str, local: LocalFile, if_match: str | None
    ) -> Uploaded | None:
        path = self._abs(relpath)
        ranges = part_ranges(local.size, self.settings.part_size)
        await self.state.upload_creating(key)
        upload_id = await self.store.create_multipart(key, metadata_for(local))
        await self.state.upload_started(upload_id, key)
        completed = False
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise TransferError(relpath, _os_reason("cannot read", exc)) from None
            try:
                etags = await gather_or_cancel(
                    [
                        self._upload_part(fd, key, upload_id, number, offset, length)
                        for number, (offset, length) in enumerate(ranges, 1)
                    ]
                )
            except _ChangedDuringUpload:
                return None  # aborted below; the caller tries again with the new version
            finally:
                os.close(fd)
            if not self._unchanged(relpath, local):
                return None  # never complete an object that may mix two versions
            self.state.write_sending(relpath, local.size, local.hash, local.executable)
            written = await self.store.complete_multipart(
                key,
                upload_id,
                etags,
                if_match=if_match,
                if_none_match=if_match is None,
                expected=(local.size, metadata_for(local)),
            )
            completed = True
        finally:
            if completed or await self._abort(key, upload_id):
                self.state.upload_ended(upload_id)
        # Some servers (rclone) list a multipart object with another ETag than Complete
        # returned. No HEAD here to learn it: on rclone that HEAD makes the server MD5 the
        # whole object at once (~0.45 s of its CPU per 256 MiB, inside the push). The next
        # sync meets the unknown ETag, proves the content by the hash in the metadata (one
        # HEAD, once) and remembers it (StreamedWalk._decide).
        return Uploaded(local, (written.etag,), written_at=written.at)

    async def _abort(self, key: str, upload_id: str) -> bool:
        """Abort an upload that will not complete. False if the server could not be told:
        its record then stays, and the next sync aborts it (SyncEngine._abort_leftover_uploads)
        instead of leaving its parts billed on the server with no record naming them."""
        try:
            # Shielded: a cancelled sync must still not leave the upload behind.
            await asyncio.shield(self.store.abort_multipart(key, upload_id))
        except Exception as exc:
            log.warning(
                "%s: could not abort upload %s now (%s); the next sync will", key, upload_id, exc
            )
            return False
        return True

    async def _upload_part(
        self, fd: int, key: str, upload_id: str, number: int, offset: int, length: int
    ) -> str:
        async with self._part_buffers.borrow(length) as buffer:
            count = await self._in_thread(os.preadv, fd, [buffer], offset)
            if count != length:
                raise _ChangedDuringUpload  # truncated under us: a rewrite is in progress
            etag = await self.store.upload_part(key, upload_id, number, buffer)
            self._count(length)
            return etag

    # ---- mode-only changes ------------------------------------------------------------
    def set_mode_local(self, action: Action) -> bool:
        """chmod the local file to the object's mode, if it is still the version the plan
        saw (False if it changed: a later pull sees it again). Through an fd opened without
        following a symlink: a name swapped meanwhile is never chmodded through."""
        planned, remote = action.local, action.remote
        assert planned is not None and remote is not None and remote.executable is not None
        try:
            dir_fd = self._open_parent(action.path, create=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise TransferError(action.path, _os_reason("cannot change the mode", exc)) from None
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(action.path.rpartition("/")[2], flags, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False  # a symlink now: not the file the plan saw
            raise TransferError(action.path, _os_reason("cannot change the mode", exc)) from None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if identity_of(st) != planned.identity or not stat_mod.S_ISREG(st.st_mode):
                return False
            os.fchmod(fd, _mode_for(remote.executable, self._umask))
        except OSError as exc:
            raise TransferError(action.path, _os_reason("cannot change the mode", exc)) from None
        finally:
            os.close(fd)
        return True

    async def set_mode_remote(self, action: Action) -> Uploaded:
        """Give the object the local file's mode by rewriting its metadata in place (pinned
        to the ETag the plan saw): no content is sent. A server that refuses, or whose
        rewrite other replicas could not see in a listing, gets a normal upload.

        The pin (x-amz-copy-source-if-match) is not honoured everywhere (moto ignores it),
        so the copy's answer is checked: a metadata-only self-copy of a single-part object
        keeps its ETag, the MD5 of the bytes, so the same ETag proves the same bytes. A
        multipart ('-N') ETag becomes another on a copy (moto, AWS): then the bytes are read
        back and hashed (a download instead of an upload). Not an upload: moto ignores
        If-Match on CompleteMultipartUpload too, and would let it overwrite a racing
        writer's version without a word."""
        local, remote = action.local, action.remote
        assert local is not None and remote is not None
        key = self.prefix + action.path
        if self._unchanged(action.path, local):
            try:
                written = await self.store.rewrite_metadata(key, remote.etag, metadata_for(local))
            except S3Error as exc:
                if exc.precondition_failed:
                    raise TransferError(action.path, CHANGED_IN_BUCKET) from None
                log.info("%s: metadata rewrite refused (%s); uploading instead", key, exc.code)
            else:
                if written is not None:
                    if written.etag != remote.etag:
                        await self._check_relabelled(action.path, key, local, written)
                    return Uploaded(
                        local, (written.etag,), content_sent=False, written_at=written.at
                    )
        return await self.upload(action)

    async def _check_relabelled(
        self, relpath: str, key: str, local: LocalFile, written: Written
    ) -> None:
        """The copy answered with another ETag than the one it was pinned to: it may have
        put our hash and mode on another writer's bytes. Read them back (pinned to the new
        ETag): ours after all (a multipart object, a server whose copies change ETags) is
        fine; anything else, or bytes that cannot be read, get the labels taken off again,
        so that no object claims a hash it does not have, and the path is reported (the
        other writer's bytes stay, as with any 412)."""
        hasher = new_content_hasher()
        try:
            await self.store.get_object(key, written.etag, hasher.update)
        except S3Error as exc:
            if exc.precondition_failed or exc.not_found:
                # Replaced or deleted again since: the relabelled version is gone already.
                raise TransferError(relpath, CHANGED_IN_BUCKET) from None
            log.warning("%s: cannot read back the rewritten object (%s)", key, exc.message)
        else:
            if hasher.hexdigest() == local.hash:
                return
        try:
            await self.store.rewrite_metadata(key, written.etag, {})
        except S3Error as exc:
            if not exc.precondition_failed and not exc.not_found:
                raise TransferError(
                    relpath,
                    "the mode rewrite may have labelled another writer's bytes, and the "
                    f"labels could not be taken off again ({exc.message}); run pull, then "
                    "finalize again",
                ) from None
        raise TransferError(relpath, RELABELLED)

    # ---- deletes ---------------------------------------------------------------------
    def delete_local(self, action: Action) -> bool:
        """Delete the local file if it is still the version the plan saw. False if it moved.
        Relative to its folder's fd: never through a folder swapped for a symlink."""
        planned = action.local
        try:
            dir_fd = self._open_parent(action.path, create=False)
        except FileNotFoundError:
            return True  # its folder is gone, and the file with it
        except OSError as exc:
            raise TransferError(action.path, _os_reason("cannot delete", exc)) from None
        try:
            name = action.path.rpartition("/")[2]
            st = lstat_at(name, dir_fd)
            if st is None:
                return True
            if planned is not None and identity_of(st) != planned.identity:
                return False  # written to since the scan: keep it, it is news
            if self.keep_local is None or not self.keep_local(action.path, dir_fd, name, planned):
                os.unlink(name, dir_fd=dir_fd)
            self.durable.changed(dir_fd)
        except OSError as exc:
            raise TransferError(action.path, _os_reason("cannot delete", exc)) from None
        finally:
            os.close(dir_fd)
        self._remove_empty_folders(action.path)
        return True

    def _remove_empty_folders(self, relpath: str) -> None:
        """Empty folders go with their last file (best effort: a folder in use stays)."""
        for reldir in reversed(parent_dirs(relpath)):
            try:
                parent_fd = self._open_parent(reldir, create=False)
            except (OSError, TransferError):
                return
            try:
                os.rmdir(reldir.rpartition("/")[2], dir_fd=parent_fd)
                self.durable.changed(parent_fd)
            except OSError:
                return
            finally:
                os.close(parent_fd)

    async def delete_remote(self, action: Action) -> None:
        """Delete the object if it is still the version the plan saw (If-Match)."""
        etag = action.remote.etag if action.remote is not None else None
        try:
            await self.store.delete(self.prefix + action.path, if_match=etag or None)
        except S3Error as exc:
            if exc.precondition_failed:
                raise TransferError(
                    action.path,
                    "the object changed in the bucket during this finalize (precondition "
                    "failed); it was not deleted: run pull to see the new version",
                ) from None
            if not exc.not_found:
                raise TransferError(action.path, exc.message) from None


class _ChangedDuringUpload(Exception):
    pass


class BufferPool:
    """Memory for transfer bodies held in memory (multipart parts, ranged downloads, whole-file
    PUT bodies): at most `budget` bytes lent at once, whatever the data and the concurrency.
    Borrowers are served in the order they asked (no barging); one larger than the whole
    budget waits until nothing else is lent, then goes alone.

    Fresh 16 MiB bytes objects per part, freed from worker threads, pile up in glibc's
    per-thread arenas (RSS 258 MiB for a 1 GiB push); reused buffers of `size` do not. A body
    much smaller or larger than `size` gets a buffer of its own length (no 16 MiB per 1 MiB file).
    Without this budget 64 whole-file PUTs of 30 MiB held 2 GiB (RSS measured 2,067 MB).
    """

    def __init__(self, size: int, budget: int) -> None:
        self.size = size
        self.budget = max(budget, size)
        self._lent = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._free: list[bytearray] = []
        self._out = 0  # pooled buffers held by borrowers (granted but not yet served: not)

    def use_size(self, size: int) -> None:
        """Pool buffers of `size` from now on (ranged downloads on a long link use smaller
        ones, parts.range_size_for); kept buffers of the old size are dropped."""
        if size != self.size:
            self.size = size
            self._free.clear()

    def _fits(self, charge: int) -> bool:
        return self._lent == 0 or self._lent + charge <= self.budget

    async def _acquire(self, charge: int) -> None:
        if not self._queue and self._fits(charge):
            self._lent += charge
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (charge, granted)
        self._queue.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(charge)  # granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(entry)
                self._grant()  # a large waiter at the head may have held smaller ones back
            raise

    def _release(self, charge: int) -> None:
        self._lent -= charge
        self._grant()

    def _grant(self) -> None:
        while self._queue:
            charge, granted = self._queue[0]
            if granted.done():
                self._queue.popleft()
                continue
            if not self._fits(charge):
                return
            self._queue.popleft()
            self._lent += charge
            granted.set_result(None)

    @contextlib.asynccontextmanager
    async def borrow(self, length: int) -> AsyncIterator[memoryview]:
        size = self.size
        pooled = size // 2 < length <= size
        charge = size if pooled else length
        await self._acquire(charge)
        try:
            if pooled:
                buffer = self._free.pop() if self._free else bytearray(size)
                self._out += 1
            else:
                buffer = bytearray(length)
            try:
                yield memoryview(buffer)[:length]
            finally:
                if pooled:
                    self._out -= 1
                    # Kept for reuse while the buffers in existence (out + kept) fit the
                    # budget. Counting the bytes lent instead dropped a buffer whenever a
                    # borrower had been granted but not yet served: 19 fresh 16 MiB buffers
                    # (zero-filled, page-faulted) in a 1 GiB pull that needs 4.
                    kept = (self._out + len(self._free) + 1) * size
                    if size == self.size and kept <= self.budget:
                        self._free.append(buffer)
        finally:
            self._release(charge)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """All of data at offset. pwrite may write less (a signal, the disk filling up) and a
    hash taken from memory would not see the hole; the next call raises the real error."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pwrite_hashed(fd: int, data: memoryview, offset: int, hasher: Hasher) -> None:
    """_pwrite_all, hashing each slice right after writing it, while the slice is still in
    the CPU's cache (a whole range is far larger than the cache: hashed afterwards, every byte
    came from memory again)."""
    for start in range(0, len(data), HASH_SLICE):
        piece = data[start : start + HASH_SLICE]
        _pwrite_all(fd, piece, offset + start)
        hasher.update(piece)


def _read_file(path: str) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        return handle.read()


def _read_into(path: str, buffer: memoryview) -> int:
    """Bytes of the file read into buffer: fewer than its length if the file shrank (the
    caller compares with the size it expects; a file that grew shows in its stat)."""
    with open(path, "rb", buffering=0) as handle:
        filled = 0
        while filled < len(buffer):
            count = handle.readinto(buffer[filled:])
            if not count:
                break
            filled += count
        return filled


def _os_reason(what: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{what}: no space left on the device"
    if exc.errno == errno.ENAMETOOLONG:
        return f"{what}: name too long for the filesystem"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied"
    return f"{what}: {exc.strerror or exc}"


async def finish_in_thread(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on a worker thread. Cancelled meanwhile, this still waits for fn to return
    before it raises: callers close the fd fn uses and give back the buffer it fills as soon
    as the cancellation reaches them, and a thread still at work would then read or write
    whatever file took the fd's number, or a buffer already lent to another transfer."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all; on the first failure cancel the rest and wait for them before raising."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
