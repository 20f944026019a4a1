"""--ready-when priority (issue 13): the priority set first, ready, the rest in the background.

The daemon installs a `PriorityPull` as the engine's download order. Every real pull then
hands it its downloads (after the deletes, with the same workers and transfer pool):
- the priority set (sidecar/core/priority.py) goes first; once every file of it is local and
  verified, the daemon is ready (a priority file that failed ends the run early instead, so
  the initial pull's usual verdict and retry decide, as with --ready-when all);
- the rest follows smallest first; a path someone waits for (/wait) jumps the queue;
- a request that has to wait for this pull (/finalize, /pull, auto-sync) makes it stop taking
  new files: the files in flight land, the run ends with what arrived recorded in BASE, the
  request runs, and a new pull (fresh listing; arrived files are skipped as in BASE) resumes
  the rest. A stopped pod resumes the same way at its next start. Large files go one at a
  time after ready (they move as parallel parts anyway, sharing the same part buffers), so
  such a stop waits for at most one of them;
- a file the user writes at a path still pending is left alone: it stays theirs, and the next
  push keeps the bucket's version beside it as a conflict copy (finalize's conflict rule).

What has not arrived has no BASE entry, so no finalize can take it for a local delete or an
edit: its object is only ever read. What is pending, its order and what failed are kept on
disk (sidecar/daemon/pullstore.py), streamed in from the plan spool: nothing here grows with
the number of files (waiters hold their paths as given, not the files under them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.core.filters import parse_syncignore
from sidecar.core.model import Action, Direction, FileError, Identity, identity_of
from sidecar.core.priority import SYNCPRIORITY, Phase, PriorityRules, covers, normalize_wait_path
from sidecar.core.units import format_bytes
from sidecar.daemon.coordinator import Coordinator, Refused
from sidecar.daemon.pullstore import PullStore

log = logging.getLogger("sidecar.priority")

Work = Callable[[Action], Awaitable[FileError | None]]
MAX_LISTED = 50
RESUME_RETRY_MAX = 60.0
# How long a stopped pull lets its downloads in flight land before it cancels them (their
# bytes are fetched again after the request): a push waits for at most this, never for a
# stalled connection or a big file on a slow link.
YIELD_GRACE = 5.0
BOOSTED = -1  # the rank of a waited path: before every phase
# Arrivals the watcher has not reported yet (auto-sync's filter, own_write), newest kept: a
# watcher that stopped, lagged or lost events must not make them a map of every file. One
# forgotten is taken for the user's change: at worst a push that finds nothing to send.
PLACED_KEPT = 65_536


@dataclass(frozen=True)
class WaitAnswer:
    status: int  # 200 all local, 404 unknown path, 500 a download failed, 504 timed out
    body: dict[str, Any]


class PullQueue:
    """One pull's downloads in priority order (the rows of a PullStore, on disk), drained by
    `workers` tasks."""

    def __init__(self, store: PullStore, big: int, grace: float = YIELD_GRACE) -> None:
        self.store = store
        self.big = big
        self.grace = grace
        self._workers: list[asyncio.Future[None]] = []
        self._cut_timer: asyncio.TimerHandle | None = None
        self.priority_left = store.priority_files
        self.priority_files = store.priority_files
        self.priority_bytes = store.priority_bytes
        self.priority_failed = 0
        self.stopped: str | None = None
        self._phase: dict[str, Phase] = {}  # of the files in flight
        self._big_in_flight: set[str] = set()
        self._wake = asyncio.Event()

    @classmethod
    def of(
        cls, downloads: Iterable[Action], rules: PriorityRules, big: int, grace: float = YIELD_GRACE
    ) -> PullQueue:
        """A queue of these downloads alone, its store in memory."""
        store = PullStore(None)
        store.stage(downloads, rules.phase)
        store.commit()
        return cls(store, big, grace)

    @property
    def priority_done(self) -> bool:
        return self.priority_left == 0

    def boost(self, specs: Iterable[str]) -> None:
        """Pending paths under `specs` (files, or folders) not started yet go first."""
        self.store.boost(specs, BOOSTED)
        self._wake.set()

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            self._wake.set()
            if self._workers:
                loop = asyncio.get_running_loop()
                self._cut_timer = loop.call_later(self.grace, self._cut)

    def _cut(self) -> None:
        busy = [worker for worker in self._workers if not worker.done()]
        if busy:
            log.info(
                "cancelled %d download(s) still in flight %gs after the pull was stopped; "
                "they start again when it resumes",
                len(busy),
                self.grace,
            )
        for worker in busy:
            worker.cancel()

    def untaken(self) -> int:
        return self.store.untaken

    def _take(self) -> Action | None:
        """The next file to start, or None when none may start now."""
        # Nothing else starts until the priority set is in: its last files get the whole
        # link and both cores (ready sooner; a waited path may still pass). After ready,
        # large files one at a time (a waited one may pass).
        taken = self.store.take(
            priority_only=self.priority_left > 0,
            big=self.big if self._big_in_flight else None,
        )
        if taken is None:
            return None
        action, rank, phase = taken
        self._phase[action.path] = Phase(phase)
        size = action.remote.size if action.remote else 0
        if rank > Phase.PRIORITY and size >= self.big:
            self._big_in_flight.add(action.path)
        return action

    def phase_of(self, path: str) -> Phase:
        """The phase of a file in flight."""
        return self._phase[path]

    async def drain(
        self,
        work: Work,
        workers: int,
        finished: Callable[[Action, FileError | None], None],
        skip: Callable[[Action], bool],
    ) -> None:
        async def worker() -> None:
            while self.stopped is None:
                action = self._take()
                if action is None:
                    if not self.store.untaken:
                        return
                    self._wake.clear()
                    await self._wake.wait()  # a large file ends, a boost, or a stop
                    continue
                error: FileError | None = None
                try:
                    if not skip(action):
                        error = await work(action)
                finally:
                    self._big_in_flight.discard(action.path)
                    self._wake.set()
                if self._phase[action.path] is Phase.PRIORITY:
                    self.priority_left -= 1
                    self.priority_failed += error is not None
                finished(action, error)
                del self._phase[action.path]

        tasks = self._workers = [asyncio.ensure_future(worker()) for _ in range(max(1, workers))]
        try:
            # A worker cancelled by _cut ends its download (the engine removes the temp
            # file); the file stays pending. Any other failure is the engine's to see.
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError
                ):
                    raise outcome
        finally:
            if self._cut_timer is not None:
                self._cut_timer.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(eq=False)
class _Waiter:
    specs: list[str]
    future: asyncio.Future[WaitAnswer]

    def covers(self, path: str) -> bool:
        return any(covers(spec, path) for spec in self.specs)


@dataclass(eq=False)
class PriorityPull:
    """Across pulls: what is pending, what failed, who waits; and the ready signal."""

    coordinator: Coordinator
    local_dir: Path
    rules: PriorityRules
    big: int  # files this big move as parts (--multipart-threshold)
    read_file: Callable[[Path, str], bytes]  # sync.read_syncignore: a safe small read
    enabled: bool = True  # False (--ready-when all): only /wait, answered from the folder
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    # Where the pending and failed paths are kept (pullstore.QUEUE_NAME, from the first pull
    # on): the state folder; None: in memory.
    spool_dir: Path | None = None
    kept_local: set[str] = field(default_factory=set)  # user files at pending paths
    queue: PullQueue | None = None
    files_arrived: int = 0
    bytes_arrived: int = 0
    ready_after: float | None = None  # seconds from start to the priority set being local
    complete_after: float | None = None  # seconds from start to nothing pending
    track_own_writes: bool = False  # auto-sync is on: remember what arrives (own_write)
    _placed: OrderedDict[str, Identity] = field(default_factory=OrderedDict)  # path -> as placed
    _placed_dirs: set[str] = field(default_factory=set)  # folders arrivals went into
    _planned: asyncio.Event = field(default_factory=asyncio.Event)
    _run_ended: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: list[_Waiter] = field(default_factory=list)
    # Not yet arrived (path -> action, phase, size) and failed (path -> why): on disk once a
    # pull planned, empty in memory before.
    _store: PullStore = field(default_factory=lambda: PullStore(None))

    # -- the engine's hook ------------------------------------------------------------------

    async def run(self, downloads: Iterable[Action], work: Work, workers: int) -> set[str]:
        left_alone: set[str] = set()
        try:
            queue = self.queue = await self._plan(downloads, work)
            store = queue.store
            self.kept_local = {path for path in self.kept_local if path in store}
            self._planned.set()
            self._reevaluate()
            if queue.priority_done:
                self._priority_done(queue)

            def skip(action: Action) -> bool:
                if not self._user_file_at(action):
                    return False
                left_alone.add(action.path)
                return True

            def finished(action: Action, error: FileError | None) -> None:
                if action.path in left_alone:
                    self._left_alone(action)
                elif error is None:
                    self._arrived(action)
                else:
                    self._failed(action, error)
                if queue.phase_of(action.path) is Phase.PRIORITY and queue.priority_done:
                    self._priority_done(queue)

            await queue.drain(work, workers, finished, skip)
            if queue.stopped:
                log.info(
                    "pull stopped with %d file(s) (%s) still to come: %s",
                    store.files,
                    format_bytes(store.nbytes),
                    queue.stopped,
                )
            return left_alone
        finally:
            self.queue = None
            if not self._store.files and self.coordinator.ready and self.complete_after is None:
                self.complete_after = round(self.clock() - self.started, 3)
                log.info("initial pull complete after %.1fs", self.complete_after)
            self._run_ended.set()

    async def _plan(self, downloads: Iterable[Action], work: Work) -> PullQueue:
        """The downloads into the store, in their order; .syncpriority fetched first."""
        store = self._open_store()
        # A new plan is the truth: a path that failed before is pending again (wait for
        # it), local now, or gone from the bucket (unknown).
        store.clear_failed()
        # Staged beside what is pending (the truth for /wait until the plan is in), with
        # the patterns of the .syncpriority here now; a new one in the bucket comes first,
        # and its patterns decide the order of everything else.
        lines, problems = self._syncpriority()
        store.stage(downloads, self.rules.with_patterns(lines).phase)
        first = store.unstage(SYNCPRIORITY)
        if first is not None:
            error = await work(first)
            if error is None:
                self._arrived(first)
            else:
                store.fail(first.path, error.reason)
            fetched, problems = self._syncpriority()
            if fetched != lines:
                store.rephase(self.rules.with_patterns(fetched).phase)
        for problem in problems:
            log.warning("%s", problem)
        store.commit()
        return PullQueue(store, self.big)

    def _open_store(self) -> PullStore:
        """The store on disk, from the first pull on (under the sync's locks, in the state
        folder it made); until then nothing was pending nor failed."""
        if self.spool_dir is not None and self._store.path is None:
            self._store.close()
            self._store = PullStore(self.spool_dir)
        return self._store

    def close(self) -> None:
        """The daemon ends: the store's file goes."""
        self._store.close()

    def pending_totals(self) -> tuple[int, int]:
        """(files, bytes) not arrived yet."""
        return self._store.files, self._store.nbytes

    def _syncpriority(self) -> tuple[list[str], list[str]]:
        """The lines of the folder's .syncpriority, and what to warn about it."""
        try:
            data = self.read_file(self.local_dir, SYNCPRIORITY)
        except Exception as exc:  # unusable: the flags' patterns and sizes still apply
            return [], [f"{SYNCPRIORITY} not used: {exc}"]
        text, problems = parse_syncignore(data)
        return text.splitlines(), [f"{SYNCPRIORITY}: {problem}" for problem in problems]

    def _user_file_at(self, action: Action) -> bool:
        """A file at a path the scan saw empty (or one kept before): the user wrote it."""
        if action.local is not None and action.path not in self.kept_local:
            return False
        return os.path.lexists(os.path.join(self.local_dir, action.path))

    def _priority_done(self, queue: PullQueue) -> None:
        if not self.coordinator.ready:
            if queue.priority_failed:
                # Ready waits for the usual verdict of the run, so it ends now, not after the
                # whole background: the initial pull retries, then is ready (degraded).
                queue.stop(f"{queue.priority_failed} file(s) of the priority set failed")
                return
            self.ready_after = round(self.clock() - self.started, 3)
            log.info(
                "ready: the priority set is local (%d file(s), %s) after %.1fs; %d file(s) "
                "(%s) follow in the background",
                queue.priority_files,
                format_bytes(queue.priority_bytes),
                self.ready_after,
                self._store.files,
                format_bytes(self._store.nbytes),
            )
            self.coordinator.mark_ready()
        if self.coordinator.pending and self._background_run():
            queue.stop("a request was waiting for the priority set")

    def own_write(self, relpath: str) -> bool:
        """Whether a change the watcher saw is a file (or folder) this pull placed, as it
        placed it: auto-sync's filter. Called from the watcher, once per change."""
        placed = self._placed.pop(relpath, None)
        path = os.path.join(self.local_dir, relpath)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return False  # gone: a delete is the user's
        if placed is not None:
            return placed == identity_of(st)
        return relpath in self._placed_dirs and stat.S_ISDIR(st.st_mode)

    def can_stop(self) -> bool:
        """Whether the running pull is a background one, which `preempt` would stop."""
        return self.queue is not None and self.coordinator.ready and self._background_run()

    def preempt(self) -> bool:
        """Coordinator.preempt: a request waits for the running sync (or the daemon stops).
        True when the running pull is a background one and now stops taking files."""
        queue = self.queue
        if queue is None or not self.can_stop():
            return False
        if queue.stopped is None:
            reason = "a request is waiting; the rest resumes after it"
            if self.coordinator.closing:
                reason = "the daemon is stopping; the rest resumes at the next start"
            log.info("background pull takes no new file: %s", reason)
            queue.stop(reason)
        return True

    def _background_run(self) -> bool:
        """The running pull is the daemon's own (initial or resumed), not one a client asked
        for and waits to see complete."""
        run = self.coordinator.current
        return run is not None and run.origin in ("initial", "background")

    # -- bookkeeping ----------------------------------------------------------------------

    def _arrived(self, action: Action) -> None:
        if self.track_own_writes and self.coordinator.ready:  # auto-sync pushes from then on
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(self.local_dir, action.path), follow_symlinks=False)
                self._placed[action.path] = identity_of(st)
                if len(self._placed) > PLACED_KEPT:
                    self._placed.popitem(last=False)
                folder = action.path.rpartition("/")[0]
                while folder and folder not in self._placed_dirs:
                    self._placed_dirs.add(folder)
                    folder = folder.rpartition("/")[0]
        size = self._store.pop(action.path) or 0
        self._store.unfail(action.path)
        self.files_arrived += 1
        self.bytes_arrived += size
        self._resolve_path(action.path)

    def _left_alone(self, action: Action) -> None:
        self._store.pop(action.path)
        if action.path not in self.kept_local:
            self.kept_local.add(action.path)
            log.warning(
                "%s: written here before the bucket's version arrived; your file is kept, "
                "and the next push keeps the bucket's version beside it as a conflict copy",
                action.path,
                extra={"kept_local": action.path},
            )
        self._resolve_path(action.path)

    # A waiter's remaining paths are the pending ones its specs cover: what is pending only
    # shrinks between plans, and each plan looks at every waiter again (_reevaluate).
    def _failed(self, action: Action, error: FileError) -> None:
        self._store.pop(action.path)
        self._store.fail(action.path, error.reason)
        for waiter in list(self._waiters):
            if waiter.covers(action.path):
                self._answer(waiter, self._failed_answer([(action.path, error.reason)]))

    def _resolve_path(self, path: str) -> None:
        for waiter in list(self._waiters):
            if waiter.covers(path) and not self._store.any_under(waiter.specs):
                self._answer(waiter, self._ok_answer(waiter.specs))

    def _reevaluate(self) -> None:
        """A new plan: every waiter looked at again (a path may be gone from the bucket)."""
        for waiter in list(self._waiters):
            answer = self._evaluate(waiter.specs)
            if answer is not None:
                self._answer(waiter, answer)
        if self.queue is not None:
            self.queue.boost(spec for waiter in self._waiters for spec in waiter.specs)

    def _answer(self, waiter: _Waiter, answer: WaitAnswer) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.future.done():
            waiter.future.set_result(answer)

    # -- /wait ----------------------------------------------------------------------------

    async def wait(self, paths: list[str], seconds: float | None) -> WaitAnswer:
        """Raises ValueError for a path that leaves the folder (a bad request)."""
        specs = list(dict.fromkeys(normalize_wait_path(p, str(self.local_dir)) for p in paths))
        deadline = None if seconds is None else self.clock() + seconds
        known = self._planned.is_set() or self.coordinator.ready
        try:
            if not known:
                # A pull that had nothing to download never plans here: ready says as much.
                waits: set[asyncio.Future[object]] = {
                    asyncio.ensure_future(self.coordinator.wait_ready())
                }
                if self.enabled:
                    waits.add(asyncio.ensure_future(self._planned.wait()))
                done, rest = await asyncio.wait(
                    waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
                )
                for future in rest:
                    future.cancel()
                if not done:
                    raise TimeoutError
        except TimeoutError:
            what = (
                "the initial pull has not listed the bucket yet"
                if self.enabled
                else ("the initial pull is not done")
            )
            return self._timeout_answer(specs, seconds, what)
        answer = self._evaluate(specs)
        if answer is not None:
            return answer
        waiter = _Waiter(specs, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        if self.queue is not None:
            self.queue.boost(specs)
        left = None if deadline is None else max(0.0, deadline - self.clock())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), left)
        except TimeoutError:
            return self._timeout_answer(specs, seconds, "still pending")
        finally:
            self._answer(waiter, WaitAnswer(499, {}))  # gone (timeout, client left): forget it

    def _evaluate(self, specs: list[str]) -> WaitAnswer | None:
        """The answer now, or None: something under `specs` is still pending."""
        store = self._store
        pending = False
        unknown: list[str] = []
        failed: list[tuple[str, str]] = []
        for spec in specs:
            mine = store.any_under([spec])
            broken = list(store.failed([spec], MAX_LISTED))  # what an answer lists, at most
            failed.extend(broken)
            pending = pending or mine
            here = not spec or os.path.lexists(os.path.join(self.local_dir, spec))
            if not mine and not broken and not here:
                unknown.append(spec)
        if unknown:
            shown = ", ".join(unknown[:MAX_LISTED])
            return WaitAnswer(
                404,
                {
                    "ok": False,
                    "error": f"not in the volume: {shown}",
                    "unknown": unknown,
                },
            )
        if failed:
            return self._failed_answer(failed)
        if not pending:
            return self._ok_answer(specs)
        return None

    def _ok_answer(self, specs: list[str]) -> WaitAnswer:
        return WaitAnswer(200, {"ok": True, "paths": specs or [""], "state": "local"})

    def _failed_answer(self, paths: list[tuple[str, str]]) -> WaitAnswer:
        failures = [{"path": path, "reason": why} for path, why in paths]
        first = failures[0]
        return WaitAnswer(
            500,
            {
                "ok": False,
                "error": f"download failed: {first['path']}: {first['reason']}",
                "failed": failures[:MAX_LISTED],
            },
        )

    def _timeout_answer(self, specs: list[str], timeout: float | None, what: str) -> WaitAnswer:
        still, count, nbytes = self._store.under(specs, MAX_LISTED)
        return WaitAnswer(
            504,
            {
                "ok": False,
                "error": f"timed out after {timeout:g}s: {what}",
                "pending": still,
                "pending_count": count,
                "bytes_pending": nbytes,
            },
        )

    def progress(self, specs: list[str]) -> tuple[int, int]:
        """(files, bytes) still pending under these specs: for a waiting client's bar."""
        normal = [normalize_wait_path(s, str(self.local_dir)) for s in specs]
        _names, files, nbytes = self._store.under(normal, 0)
        return files, nbytes

    # -- the background ---------------------------------------------------------------------

    async def keep_pulling(self) -> None:
        """After ready: resume the rest whenever a pull ended with files still to come."""
        await self.coordinator.wait_ready()
        if not self._planned.is_set():  # the initial pull had nothing to download
            self._planned.set()
            self.complete_after = self.ready_after = round(self.clock() - self.started, 3)
        delay = 1.0
        while True:
            await self._run_ended.wait()
            self._run_ended.clear()
            if not self._store.files or self.queue is not None or self.coordinator.closing:
                continue
            try:
                ticket = self.coordinator.submit(
                    Direction.PULL, join_running=False, origin="background"
                )
            except Refused:
                return
            result = await ticket.result()
            if result.fatal is not None and not self.coordinator.closing:
                log.warning("background pull failed (%s); again in %.0fs", result.fatal, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESUME_RETRY_MAX)
                self._run_ended.set()
            else:
                delay = 1.0

    def status(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        files, size = self.pending_totals()
        failed_count = self._store.failed_count()
        run = self.coordinator.current
        now = self.clock()
        rate = 0.0
        if self.queue is not None and run is not None and run.progress is not None:
            rate = run.progress.rate(now)
        if not self._planned.is_set():
            state = "listing"
        elif self.queue is not None:
            state = "priority set" if not self.queue.priority_done else "pulling"
        elif files:
            state = "paused"
        else:
            state = "complete" if not failed_count else "complete, with failures"
        return {
            "enabled": True,
            "state": state,
            "files_pending": files,
            "bytes_pending": size,
            "files_arrived": self.files_arrived,
            "bytes_arrived": self.bytes_arrived,
            "rate_bytes_per_second": round(rate, 1),
            "eta_seconds": round(size / rate, 1) if rate > 0 and files else None,
            "failed": [{"path": p, "reason": r} for p, r in self._store.failed(limit=50)],
            "failed_count": failed_count,
            "user_files_kept": sorted(self.kept_local)[:MAX_LISTED],
            "waiting_requests": len(self._waiters),
            "time_to_ready_seconds": self.ready_after,
            "time_to_complete_seconds": self.complete_after,
        }
