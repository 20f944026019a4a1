"""Opt-in auto-sync: watch the folder, push (finalize) once changes settle.

A push is due when the folder has been quiet for `debounce` seconds, or `max_delay` seconds
after the first unpushed change even if writes never stop. Waiting for quiet is what keeps a
file that is still being written from being pushed half-done; under constant writes the
engine's before/after check still makes every object one consistent version, and the file is
pushed again once it settles. So a pod killed without warning loses at most the last
debounce (at most max_delay) seconds of work, plus the push in progress.

The watcher starts with the daemon when the folder exists, so no change slips between
"ready" and "watching"; pushes wait for readiness (finalize is refused before the initial
pull anyway). The daemon's own pulls also write into the folder and so cause one extra push,
which is a cheap no-op. A folder that does not exist yet (the initial pull creates it) is
waited for; a folder removed or replaced, or a watcher that fails or dies, is watched again.
Whenever watching (re)starts after the daemon became ready, one push is scheduled for the
changes nobody saw. /status and `sidecar_auto_sync_watching` say whether it is watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from sidecar.core.filters import PathFilter
from sidecar.core.model import Direction
from sidecar.daemon.coordinator import Coordinator, Refused

log = logging.getLogger("sidecar.autosync")

MAX_RETRY_DELAY = 60.0
# The source of change batches: watchfiles.awatch's signature (folder, then keywords: the
# filter, debounce, stop event, polling). Tests inject one that yields the batches they
# script, so they wait on the batch being taken in instead of sleeping.
Watch = Callable[..., AsyncIterator[set[tuple[Change, str]]]]
FOLDER_POLL = 1.0  # how often to look for a missing folder or a replaced one
WATCH_RETRY = 5.0  # pause before watching again after the watcher failed


@dataclass(frozen=True)
class ChangeFilter:
    """Which watched paths count as user changes. Segments are taken below `root` only, so
    a folder that itself lives under a `__pycache__` is still watched."""

    root: str
    # The daemon's own writes (PriorityPull.own_write: files its background pull placed):
    # not user changes, so arrivals do not trigger pushes that would keep stopping the pull.
    own_write: Callable[[str], bool] | None = None
    # The sync's own path rules (sidecar/core/filters.py), defaults only: a change they hide
    # is no change to push.
    paths: PathFilter = field(default_factory=PathFilter)

    def __call__(self, change: Change, path: str) -> bool:
        relative = os.path.relpath(path, self.root)
        if relative == "." or relative.startswith(".." + os.sep):
            return False
        relpath = relative.replace(os.sep, "/")
        if not self.paths.sees_change(relpath):
            return False
        return self.own_write is None or not self.own_write(relpath)


@dataclass
class AutoSync:
    coordinator: Coordinator
    folder: Path
    debounce: float
    max_delay: float
    clock: Callable[[], float] = time.monotonic
    state: str = "waiting for the initial pull"
    first_change: float | None = None  # oldest change not yet handed to a push
    last_change: float | None = None
    pending_changes: int = 0
    pushes: int = 0
    failures_in_row: int = 0
    retry_at: float | None = None
    last_push: dict[str, Any] | None = None
    watcher_error: str | None = None
    watcher_state: str = "not started"  # waiting for the folder, watching, restarting, stopped
    watcher_restarts: int = 0
    own_write: Callable[[str], bool] | None = None  # see ChangeFilter
    watch: Watch = awatch
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _watcher: asyncio.Task[None] | None = None

    @property
    def watching(self) -> bool:
        return self.watcher_state == "watching"

    # -- pure-ish pieces, driven by tests with a fake clock -------------------------------

    def note_changes(self, count: int) -> None:
        now = self.clock()
        if self.first_change is None:
            self.first_change = now
        self.last_change = now
        self.pending_changes += count
        self._changed.set()

    def due_at(self) -> float | None:
        """When the next push should start, or None with nothing to push."""
        if self.first_change is None or self.last_change is None:
            return None
        due = min(self.last_change + self.debounce, self.first_change + self.max_delay)
        return max(due, self.retry_at) if self.retry_at is not None else due

    def status(self) -> dict[str, Any]:
        now = self.clock()
        due = self.due_at()
        return {
            "enabled": True,
            "state": self.state,
            "debounce_seconds": self.debounce,
            "max_delay_seconds": self.max_delay,
            "pending_changes": self.pending_changes,
            "oldest_unpushed_change_seconds": (
                None if self.first_change is None else round(now - self.first_change, 3)
            ),
            "next_push_in_seconds": None if due is None else round(max(0.0, due - now), 3),
            "pushes": self.pushes,
            "last_push": self.last_push,
            "watching": self.watching,
            "watcher_state": self.watcher_state,
            "watcher_restarts": self.watcher_restarts,
            "watcher_error": self.watcher_error,
        }

    # -- the loops ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._start_watcher(stop)
        try:
            await _until(stop, self.coordinator.wait_ready())
            while not stop.is_set():
                due = self.due_at()
                if due is None:
                    self.state = "idle"
                    self._changed.clear()
                    await _until(stop, self._changed.wait())
                    continue
                delay = due - self.clock()
                if delay > 0:
                    self.state = "settling"
                    self._changed.clear()
                    await _until(stop, asyncio.wait_for(self._changed.wait(), delay))
                    continue
                if not await self._push():
                    break
        finally:
            self.state = "stopped"
            watcher, self._watcher = self._watcher, None  # no restart from here on
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self.watcher_state = "stopped"

    async def _push(self) -> bool:
        """One push of everything noted so far. False when the daemon will take no more."""
        count, self.pending_changes = self.pending_changes, 0
        self.first_change = self.last_change = None
        self.retry_at = None
        self.state = "pushing"
        try:
            # join_running=False: a finalize already under way scanned before these changes.
            ticket = self.coordinator.submit(
                Direction.FINALIZE, join_running=False, origin="auto-sync"
            )
            result = await ticket.result()
        except Refused as exc:
            self.note_changes(count)  # still unpushed: the shutdown push takes over
            log.info("auto-sync push not started: %s", exc.reason)
            return not self.coordinator.closing
        self.pushes += 1
        self.last_push = {
            "ok": result.ok,
            "changes": count,
            "files_transferred": result.files_transferred,
            "files_deleted": result.files_deleted,
            "seconds": round(result.seconds, 3),
            "fatal": result.fatal,
        }
        if result.ok:
            self.failures_in_row = 0
            return True
        # Keep the changes pending and back off; a later change does not shorten the wait.
        self.failures_in_row += 1
        # At least a second: a zero debounce must not turn a failing push into a busy loop.
        base = max(1.0, self.debounce)
        delay = min(MAX_RETRY_DELAY, base * 2 ** (self.failures_in_row - 1))
        self.note_changes(count)
        self.retry_at = self.clock() + delay
        log.warning("auto-sync push failed; retrying in %.1fs", delay)
        return True

    def _start_watcher(self, stop: asyncio.Event, delay: float = 0.0) -> None:
        task = asyncio.create_task(self._watch(stop, delay), name="auto-sync-watch")
        task.add_done_callback(lambda done: self._watcher_ended(done, stop))
        self._watcher = task

    def _watcher_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """A watcher that dies while the daemon runs (a bug, not a failure it handled) is
        restarted: auto-sync must never go quiet without saying so."""
        if task is not self._watcher or stop.is_set():
            return
        error = None if task.cancelled() else task.exception()
        self.watcher_error = f"watcher died: {error!r}" if error else "watcher ended"
        self.watcher_state = "restarting"
        self.watcher_restarts += 1
        log.error("auto-sync %s; restarting it in %gs", self.watcher_error, WATCH_RETRY)
        self._start_watcher(stop, WATCH_RETRY)

    async def _watch(self, stop: asyncio.Event, delay: float = 0.0) -> None:
        if delay:
            await _until(stop, asyncio.sleep(delay))
        force_polling: bool | None = None
        waiting_logged = False
        while not stop.is_set():
            identity = _identity(self.folder)
            if identity is None:
                # watchfiles would wait silently forever on a path that does not exist.
                self.watcher_state = "waiting for the folder"
                if not waiting_logged:
                    log.warning(
                        "auto-sync: %s does not exist (yet); watching starts once it does",
                        self.folder,
                    )
                    waiting_logged = True
                await _until(stop, asyncio.sleep(FOLDER_POLL))
                continue
            waiting_logged = False
            replaced = asyncio.Event()
            sentinel = asyncio.create_task(self._until_replaced(identity, stop, replaced))
            try:
                self.watcher_state = "watching"
                log.info("auto-sync watching %s", self.folder)
                if self.coordinator.ready:
                    self.note_changes(0)  # whatever changed while nothing watched
                async for changes in self.watch(
                    self.folder,
                    watch_filter=ChangeFilter(str(self.folder), self.own_write),
                    debounce=200,
                    step=50,
                    stop_event=replaced,
                    force_polling=force_polling,
                    ignore_permission_denied=True,
                ):
                    self.note_changes(len(changes))
                if not stop.is_set():
                    log.warning(
                        "auto-sync: %s was removed or replaced; watching again", self.folder
                    )
                    self.watcher_restarts += 1
            except Exception as exc:  # e.g. the inotify watch limit: fall back to polling
                self.watcher_error = f"{type(exc).__name__}: {exc}"
                self.watcher_state = "restarting"
                self.watcher_restarts += 1
                log.error("auto-sync watcher failed (%s); switching to polling", exc)
                force_polling = True
                await _until(stop, asyncio.sleep(WATCH_RETRY))
            finally:
                sentinel.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sentinel

    async def _until_replaced(
        self, identity: tuple[int, int], stop: asyncio.Event, replaced: asyncio.Event
    ) -> None:
        """Set `replaced` when the daemon stops or the folder is no longer the one watched."""
        while not stop.is_set() and _identity(self.folder) == identity:
            await _until(stop, asyncio.sleep(FOLDER_POLL))
        replaced.set()


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder, None when it is not a folder."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


async def _until(stop: asyncio.Event, awaitable: Any) -> None:
    """Await `awaitable` unless `stop` is set first; a timeout just ends the wait."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            if not pending.done():
                pending.cancel()
        for finished in (task, stopper):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await finished
