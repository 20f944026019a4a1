"""File-system steps inside the sync folder that stay inside it whatever the user does
meanwhile (renames a folder, swaps one for a symlink, replaces a file).

- Every folder is reached from the root folder's fd, one component at a time, with
  O_NOFOLLOW | O_DIRECTORY: a symlink on the way is refused, never followed. Each step then
  works relative to that folder's fd (`dir_fd=`), so a path is never resolved twice.
- rename_noreplace: a rename that cannot replace anything (renameat2 RENAME_NOREPLACE).
- Durability: folders whose entries changed are fsynced in batches, and only then are the
  records that depend on them run (a BASE entry must never reach the disk before the file
  it describes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("sidecar.folder")  # logger name kept from before the move

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
RENAME_NOREPLACE = 1
# The kernel or the filesystem cannot do RENAME_NOREPLACE (old kernels, some network and
# FUSE filesystems): fall back to link + unlink.
_NOREPLACE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


class UnsafeFolder(Exception):
    """A folder on the way is a symlink or a file: nothing is done through it."""


class Folder:
    """The sync folder, held open: every other folder is opened relative to it."""

    def __init__(self, root: str) -> None:
        self.root = root
        # The root itself is the operator's choice and may be a symlink (a mount path):
        # it is resolved once, here; everything below it never follows one.
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def open_dir(self, reldir: str, create: bool = False) -> int:
        """An fd of folder reldir ('' is the root), reached without following any symlink;
        missing folders are made when `create`. The caller closes it.

        Raises UnsafeFolder (a symlink or a file on the way), FileNotFoundError (missing,
        not `create`) or another OSError."""
        fd = os.dup(self._fd)
        if not reldir:
            return fd
        done: list[str] = []
        try:
            for name in reldir.split("/"):
                done.append(name)
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    # Made meanwhile by someone else: opened with the same checks below.
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                    child = _open_checked(name, fd, "/".join(done))
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise _unsafe(name, fd, "/".join(done)) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


def _open_checked(name: str, dir_fd: int, reldir: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _unsafe(name, dir_fd, reldir) from None
        raise


def _unsafe(name: str, dir_fd: int, reldir: str) -> UnsafeFolder:
    try:
        is_link = stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return UnsafeFolder(f"folder {reldir!r} is a symlink; not writing through it")
    return UnsafeFolder(f"{reldir!r} is a file here, the bucket has a folder")


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    """lstat of name in the folder, None if there is nothing there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def rename_noreplace(src: str, dst: str, dir_fd: int) -> None:
    """Rename src to dst in one folder; FileExistsError if dst exists, never replaced.

    renameat2(RENAME_NOREPLACE) is atomic: there is no moment at which both names exist or
    at which a file the user puts at src meanwhile could be removed. link + unlink (the
    fallback where the filesystem cannot do it) has such a moment: the file moved is the
    one linked, but a file written at src between the link and the unlink is unlinked.
    """
    if _renameat2 is not None:
        result = _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in _NOREPLACE_UNSUPPORTED:
            raise OSError(code, os.strerror(code), dst)
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)


class Durability:
    """Runs records (BASE entries) only after the folders they depend on are on disk.

    A download's data is fsynced by the download; its rename lives in its folder's entry,
    made durable by an fsync of that folder. Folders are fsynced once per batch (a folder
    of 2,000 new files costs one fsync, not 2,000), then the batch's records run. A crash
    before that loses only records, which costs a re-check on the next run (equal content
    is adopted), never a BASE entry that claims bytes the disk does not have.
    """

    def __init__(
        self, executor: ThreadPoolExecutor, max_records: int = 256, max_age: float = 0.5
    ) -> None:
        self._executor = executor
        self._max_records = max_records
        self._max_age = max_age
        self._folders: dict[tuple[int, int], int] = {}  # (dev, inode) -> own fd
        self._records: list[Callable[[], None]] = []
        self._oldest = 0.0
        self._lock = asyncio.Lock()
        # A batch is flushed within max_age even when no later record comes to push it out
        # (a pull whose last small files landed while one big download goes on for minutes):
        # a record held in memory is lost by kill -9 like an unwritten one.
        self._timer: asyncio.TimerHandle | None = None
        self._timed_flush: asyncio.Task[None] | None = None
        # Batches whose fsync was still running when the sync was cancelled.
        self._owed: list[tuple[Future[bool], list[Callable[[], None]]]] = []

    def changed(self, dir_fd: int) -> None:
        """The entries of this folder changed (a rename, a delete)."""
        st = os.fstat(dir_fd)
        key = (st.st_dev, st.st_ino)
        if key not in self._folders:
            self._folders[key] = os.dup(dir_fd)

    async def then(self, record: Callable[[], None]) -> None:
        """Run record once every folder changed so far is on disk (batched)."""
        if not self._records:
            self._oldest = time.monotonic()
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(
                    self._max_age, self._flush_in_background
                )
        self._records.append(record)
        full = len(self._records) >= self._max_records or len(self._folders) >= MAX_OPEN_FOLDERS
        if full or time.monotonic() - self._oldest >= self._max_age:
            await self.flush()

    def _flush_in_background(self) -> None:
        self._timer = None
        if self._records and (self._timed_flush is None or self._timed_flush.done()):
            self._timed_flush = asyncio.ensure_future(self._flush_logged())

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:  # the sync's own flush at its end runs what is still owed
            log.exception("background flush of transfer records failed")

    async def flush(self) -> None:
        async with self._lock:
            folders, records = self._take()
            if not records and not folders:
                return
            job = self._executor.submit(_fsync_all, folders)
            try:
                # Shielded: a cancelled sync still lets the fsync finish (flush_now waits).
                await asyncio.shield(asyncio.wrap_future(job))
            except BaseException:
                self._owed.append((job, records))
                raise
            _settle(job.result(), records)

    def flush_now(self) -> None:
        """flush, on this thread: for a sync that ends by an exception or a cancel."""
        owed, self._owed = self._owed, []
        for job, records in owed:
            _settle(job.result(), records)
        folders, records = self._take()
        _settle(_fsync_all(folders), records)

    def _take(self) -> tuple[list[int], list[Callable[[], None]]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        folders, self._folders = list(self._folders.values()), {}
        records, self._records = self._records, []
        return folders, records


MAX_OPEN_FOLDERS = 64  # fds held for a batch; a full set flushes it


def _fsync_all(fds: list[int]) -> bool:
    ok = True
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("cannot fsync a folder of the sync folder: %s", exc)
            ok = False
        finally:
            os.close(fd)
    return ok


def _settle(synced: bool, records: list[Callable[[], None]]) -> None:
    if not synced:
        # Not recorded: the next run finds these files without BASE entries and compares
        # them (equal content is adopted), which is safe; recording them would not be.
        log.error("%d transfer record(s) dropped: their folder could not be synced", len(records))
        return
    for record in records:
        record()
