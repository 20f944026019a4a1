"""Exclusive locks for one sync: its state folder and its local folder.

Two syncs of one folder at once (a CronJob run and a manual Job on one PVC, two `--once` in
two terminals, a `--once` beside the daemon) each saw the other's downloads as local changes
and made a conflict copy of every file. A sync therefore holds, for its whole run:

- the state lock: flock on `lock` in its state folder, which also records who holds it (pid,
  host, command, operation, start) so a waiter can name the holder;
- the folder lock: flock on the local folder's own fd, so two syncs with different state
  folders exclude each other too, and nothing is added to the user's folder. Filesystems that
  cannot flock a directory (NFS maps flock to POSIX locks, which need a file open for writing)
  leave only the state lock, with a warning; the holder is named from /proc/locks when it runs
  on this host.

A waiter polls (flock LOCK_NB) so the event loop never blocks, until --lock-timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("sidecar.lock")  # logger name kept from before the move

LOCK_FILE = "lock"
POLL_SECONDS = 0.2


class LockBusy(Exception):
    """Another process holds a lock we need; the message names it."""


def holder_record(operation: str) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["sidecar", *sys.argv[1:]])[:300],
        "operation": operation,
        "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_holder(record: dict[str, object]) -> str:
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')} "
        f"({record.get('command', '?')}; {record.get('operation', '?')} since "
        f"{record.get('since', '?')})"
    )


class SyncLock:
    """Held from acquire_state() to release(); one per sync run. Both acquisitions share one
    deadline: --lock-timeout from the first."""

    def __init__(
        self, state_dir: Path, folder: Path, timeout: float, share_folder: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.folder = folder
        # The shards of one sharded sync (--shard) share the folder with each other (their
        # paths are disjoint, each has its own state lock) and exclude any unsharded sync.
        self.share_folder = share_folder
        self.timeout = timeout
        self._deadline = 0.0
        self._state_fd: int | None = None
        self._folder_fd: int | None = None

    async def acquire_state(self, operation: str) -> None:
        """Raises LockBusy naming the holder, or OSError if the lock file cannot be made."""
        self._deadline = time.monotonic() + self.timeout
        try:
            await self._wait(self._try_state, self._state_holder)
            assert self._state_fd is not None
            _write_record(self._state_fd, holder_record(operation))
        except BaseException:
            self.release()
            raise

    async def acquire_folder(self) -> None:
        """After acquire_state, once the folder exists."""
        try:
            await self._wait(self._try_folder, self._folder_holder)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._folder_fd is not None:
            os.close(self._folder_fd)  # closing drops the flock
            self._folder_fd = None
        if self._state_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._state_fd, 0)  # no stale holder for the next reader
            os.close(self._state_fd)
            self._state_fd = None

    async def _wait(self, attempt: Callable[[], bool], holder: Callable[[], str]) -> None:
        announced = False
        while not attempt():
            who = holder()
            if time.monotonic() >= self._deadline:
                if self.timeout == 0:
                    raise LockBusy(f"{who}; not waiting (--lock-timeout 0)")
                raise LockBusy(
                    f"{who}; still held after waiting {self.timeout:g}s (--lock-timeout)"
                )
            if not announced:
                log.info("waiting up to %gs (--lock-timeout) for %s", self.timeout, who)
                announced = True
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, self._deadline - time.monotonic())))

    # ---- the state lock ------------------------------------------------------------------
    @property
    def state_lock_path(self) -> Path:
        return self.state_dir / LOCK_FILE

    def _try_state(self) -> bool:
        if self._state_fd is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._state_fd = os.open(
                self.state_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        try:
            fcntl.flock(self._state_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _state_holder(self) -> str:
        record: dict[str, object] = {}
        try:
            text = self.state_lock_path.read_text()
            if text.strip():
                record = json.loads(text)
        except (OSError, ValueError):
            pass  # being written this very moment: name what we can
        who = describe_holder(record) if record else "another process"
        return f"the state {self.state_dir} is locked by {who} (lock {self.state_lock_path})"

    # ---- the folder lock -----------------------------------------------------------------
    def _try_folder(self) -> bool:
        if self._folder_fd is None:
            self._folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mode = fcntl.LOCK_SH if self.share_folder else fcntl.LOCK_EX
            fcntl.flock(self._folder_fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(
                "cannot lock the folder %s on this filesystem (%s); only the state lock "
                "keeps two syncs apart",
                self.folder,
                exc.strerror,
            )
            os.close(self._folder_fd)
            self._folder_fd = None
        return True

    def _folder_holder(self) -> str:
        pid = _flock_holder_pid(self.folder)
        who = "another process (another --state-dir?)"
        if pid is not None:
            who = f"pid {pid} ({_command_of(pid)})"
        return f"the local folder {self.folder} is being synced by {who}"


def _write_record(fd: int, record: dict[str, object]) -> None:
    data = json.dumps(record).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _flock_holder_pid(path: Path) -> int | None:
    """The pid holding a FLOCK on path, from /proc/locks (this host and pid namespace)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a blocked waiter)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            try:
                pid = int(fields[4])
            except ValueError:
                continue
            if pid != os.getpid():
                return pid
    return None


def _command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "command unknown"
    words = [a.decode(errors="replace") for a in argv if a]
    return " ".join(words)[:300] or "command unknown"
