"""The coordinator: one sync at a time between HTTP requests, auto-sync and the lifecycle.

- A request for the operation already running joins it only while that run has not begun
  to scan the folder and list the bucket (phase "starting"): a run that already looked
  cannot answer for a file saved before the request arrived. Otherwise the request queues.
- Waiting requests queue in FIFO order; those for the same operation (and dry-run flag)
  share one later run, so a burst of triggers costs one sync, not a backlog.
- `join_running=False` (auto-sync, the shutdown push) never joins a run that is already
  under way, whatever its phase.
- An undo or restore (issue 14, `submit_work`) takes the sync locks too: it takes its turn
  in the same queue (never joined nor coalesced) instead of waiting on the engine's lock
  beside the coordinator and failing after --lock-timeout with the daemon as the holder.
- It remembers the current progress, the last result per operation, the last error and
  readiness. Read-only daemons refuse finalize.
- Ready: a real (non-dry-run) pull has applied everything it safely could (`pull_verdict`).
  A pull that ran through but left some paths out (bad keys, clashes, per-file errors) or
  withheld its deletes makes the daemon ready but *degraded*, with the problems on record,
  until a later pull comes back clean.

No globals and no I/O of its own: the engine is anything with `run`, `in_flight` and
`retries_total`, so the coordination rules are tested with a fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, cast

from sidecar.core.model import Direction, FileError
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult
from sidecar.core.units import format_duration
from sidecar.daemon.metrics import SyncCounters, outcome
from sidecar.daemon.policy import Fate, Running, running_fate

log = logging.getLogger("sidecar.daemon")

MAX_LOGGED_ERRORS = 50
# The phase of a run before the engine starts scanning (the engine sets "scanning" right
# before it reads the folder and lists the bucket); a request may join a run only then.
NOT_YET_SCANNED = "starting"


class Engine(Protocol):
    in_flight: int
    retries_total: int

    async def run(
        self, direction: Direction, *, dry_run: bool = False, progress: Progress | None = None
    ) -> SyncResult: ...


class PullVerdict(StrEnum):
    CLEAN = "clean"  # everything applied: ready
    DEGRADED = "degraded"  # applied all it safely could; some paths left out: ready, degraded
    RETRY = "retry"  # could not run, or problems that another attempt may clear: not ready


def pull_verdict(result: SyncResult, before: frozenset[str] | None = None) -> PullVerdict:
    """Whether a real pull "applied everything it safely could".

    - A fatal error (server unreachable, credentials, bucket, disk, a cancel) means the pull
      did not run through: retry.
    - Per-path errors (a key that is not a valid path, a key that is both a file and a
      folder, a name too long, a file that failed to transfer) or deletes the guard withheld
      are DEGRADED once they are lasting: the pull that ran through moved nothing, or it
      reported no problem that the previous pull that ran through (`before`, from
      `problems`) had not reported too. Otherwise it is retried first, so errors of a server
      that failed half-way (transport failures surface as per-file errors) get another
      chance, while a bucket that keeps receiving new objects cannot hold readiness forever.
    """
    if result.fatal is not None:
        return PullVerdict.RETRY
    if result.ok:
        return PullVerdict.CLEAN
    moved = result.files_transferred or result.files_deleted
    if moved and (before is None or not problems(result) <= before):
        return PullVerdict.RETRY
    return PullVerdict.DEGRADED


def problems(result: SyncResult) -> frozenset[str]:
    """The paths a pull left out, plus a marker for withheld deletes."""
    found = {error.path for error in result.errors}
    return frozenset(found | ({"(deletes withheld)"} if result.deletes_blocked else set()))


class Refused(Exception):
    """The daemon will not run this request (read-only, not ready yet, shutting down)."""

    def __init__(self, reason: str, *, retry_later: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_later = retry_later  # 503 (try again) rather than 409 (never, as configured)


@dataclass(frozen=True, slots=True)
class Job:
    direction: Direction
    dry_run: bool = False
    work: str = ""  # an undo or restore ("undo ID", "restore PATH"): not a sync

    @property
    def operation(self) -> str:
        return self.work.split(maxsplit=1)[0] if self.work else str(self.direction)

    def __str__(self) -> str:
        return f"{self.work or self.direction}{' (dry run)' if self.dry_run else ''}"


@dataclass(eq=False)
class Run:
    """One sync, queued or running, and everyone waiting for its result."""

    job: Job
    origin: str  # who asked first: api, initial, auto-sync, shutdown
    future: asyncio.Future[Any]  # a SyncResult; an undo's or restore's report for `work`
    queued_at: float
    started_at: float | None = None
    progress: Progress | None = None
    requesters: int = 1
    task: asyncio.Task[Any] | None = None
    work: Callable[[], Awaitable[Any]] | None = None  # an undo or restore instead of a sync

    @property
    def unscanned(self) -> bool:
        """True until the engine starts looking at the folder and the bucket."""
        return self.progress is None or self.progress.phase == NOT_YET_SCANNED

    async def result(self) -> SyncResult:
        return cast(SyncResult, await self.outcome())

    async def outcome(self) -> Any:
        # shield: a caller that goes away (client disconnect) must not cancel a sync others
        # are waiting for.
        return await asyncio.shield(self.future)


@dataclass(frozen=True, slots=True)
class Ticket:
    run: Run
    state: str  # "joined" (the run was already going), "queued", "started"

    async def result(self) -> SyncResult:
        return await self.run.result()


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class Coordinator:
    engine: Engine
    read_only: bool = False
    # Called when a request has to wait for the running sync: a pull that only goes on in
    # the background (--ready-when priority) then stops early and resumes after it. True
    # when it did stop one.
    preempt: Callable[[], bool] | None = None
    counters: SyncCounters = field(default_factory=SyncCounters)  # every finished sync
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    current: Run | None = None
    pending: list[Run] = field(default_factory=list)
    last_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_error: dict[str, Any] | None = None
    ready: bool = False
    degraded: dict[str, Any] | None = None  # what the last pull that ran through left out
    _degraded_errors: frozenset[FileError] = frozenset()
    _pull_problems: frozenset[str] | None = None  # of the last real pull that ran through
    closing: bool = False  # shutting down: only finalize is still taken
    closed: bool = False  # the shutdown push is over: nothing is taken
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=_set_event)
    _worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Coordinator:
        self._worker = asyncio.create_task(self._work(), name="sync-coordinator")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close("daemon stopped", cancel_running=True)
        self.refuse_new_work()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), 30)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    # -- requests -------------------------------------------------------------------------

    def submit(
        self,
        direction: Direction,
        *,
        dry_run: bool = False,
        join_running: bool = True,
        origin: str = "api",
        allow_closing: bool = False,
    ) -> Ticket:
        """Join, coalesce or queue a sync. Raises Refused at once when it cannot run.

        While closing, only finalize is taken: a preStop hook's `sidecar finalize` then
        joins the shutdown push instead of failing.
        """
        if self.closed or (
            self.closing and (direction is Direction.PULL or dry_run) and not allow_closing
        ):
            raise Refused("the daemon is shutting down", retry_later=True)
        if direction is Direction.FINALIZE and self.read_only:
            raise Refused(
                "finalize refused: this sidecar runs with --read-only (pull only); "
                "local changes are never pushed"
            )
        job = Job(direction, dry_run)
        if direction is Direction.FINALIZE and not dry_run and not self._pull_may_make_ready():
            raise Refused(self._not_ready_reason(), retry_later=True)
        current = self.current
        if join_running and current is not None and current.job == job and current.unscanned:
            current.requesters += 1
            return Ticket(current, "joined")
        if current is not None and self.preempt is not None:
            self.preempt()
        for run in self.pending:
            if run.job == job:
                run.requesters += 1
                return Ticket(run, "queued")
        run = Run(
            job=job,
            origin=origin,
            future=asyncio.get_running_loop().create_future(),
            queued_at=self.clock(),
        )
        self.pending.append(run)
        self._idle.clear()
        self._wakeup.set()
        return Ticket(run, "queued" if current is not None or len(self.pending) > 1 else "started")

    def submit_work(
        self, name: str, work: Callable[[], Awaitable[Any]], *, dry_run: bool = False
    ) -> Ticket:
        """Queue an undo or restore (`name`: "undo ID", "restore PATH"): it takes the engine's
        sync locks, so it takes its turn like a sync; its outcome is what `work` returns."""
        if self.closing or self.closed:
            raise Refused("the daemon is shutting down", retry_later=True)
        if self.current is not None and self.preempt is not None:
            self.preempt()
        run = Run(
            job=Job(Direction.FINALIZE, dry_run, name),
            origin="api",
            future=asyncio.get_running_loop().create_future(),
            queued_at=self.clock(),
            work=work,
        )
        self.pending.append(run)
        self._idle.clear()
        self._wakeup.set()
        return Ticket(
            run, "queued" if self.current is not None or len(self.pending) > 1 else "started"
        )

    async def wait_ready(self) -> None:
        await self._ready_event.wait()

    def mark_ready(self) -> None:
        """Ready before the running pull ends (its priority set is local, the rest still
        coming: --ready-when priority); degraded or not is decided when it ends."""
        if not self.ready:
            self.ready = True
            self._ready_event.set()

    def cancel_current(self, reason: str) -> Run | None:
        """Cancel the running sync (the engine leaves no half-written object current)."""
        run = self.current
        if run is not None and run.task is not None and not run.task.done():
            log.warning("cancelling %s: %s", run.job, reason)
            run.task.cancel(reason)
            return run
        return None

    def close(self, reason: str, *, keep: Job | None = None, cancel_running: bool = False) -> None:
        """Start shutting down: drop queued runs (except `keep`) and cancel a running pull.

        The final finalize should not wait behind a pull nobody needs any more.
        `cancel_running` also cancels a running finalize (the shutdown deadline passed).
        """
        self.closing = True
        for run in list(self.pending):
            if run.job != keep:
                self.pending.remove(run)
                if run.work is not None:
                    refused = Refused(f"{run.job} cancelled: {reason}", retry_later=True)
                    self._finish(run, None, error=refused)
                else:
                    self._finish(run, _cancelled_result(run.job, reason), record=False)
        current = self.current
        if current is None and not self.pending:
            self._idle.set()
        # A background pull stops at a file boundary instead (its files in flight get a few
        # seconds): what arrived is committed, and no step is cut in the middle.
        stops = current is not None and self.preempt is not None and self.preempt()
        if running_fate(self.running(stops=stops), cut_short=cancel_running) is Fate.CANCELLED:
            self.cancel_current(reason)

    def refuse_new_work(self) -> None:
        """The shutdown push is over, or will not happen: refuse every request from now on,
        finalize included (`close` still lets the shutdown's own finalize in)."""
        self.closed = True

    async def idle(self) -> None:
        """Until nothing runs or waits."""
        await self._idle.wait()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        current = None
        if self.current is not None and self.current.progress is not None:
            current = _current(self.current, self.current.progress, now)
        return {
            "ready": self.ready,
            "degraded": self.degraded is not None,
            "degraded_by": self.degraded,
            "read_only": self.read_only,
            "shutting_down": self.closing,
            "current": current,
            "queued": [
                {
                    "operation": run.job.operation,
                    "dry_run": run.job.dry_run,
                    "origin": run.origin,
                    "waiting_seconds": round(now - run.queued_at, 3),
                    "requesters": run.requesters,
                }
                for run in self.pending
            ],
            "last_results": self.last_results,
            "last_error": self.last_error,
            "in_flight_requests": self.engine.in_flight,
            "retries_total": self.engine.retries_total,
            "inflight_budget": _inflight_budget(self.engine),
            **_fleet_status(self.engine),
        }

    def running_operation(self) -> str | None:
        return None if self.current is None else self.current.job.operation

    def running(self, *, stops: bool) -> Running:
        """The running sync as a stop sees it; `stops`: a background pull that stops at a
        file boundary when asked (`preempt`)."""
        if self.current is None:
            return Running.NOTHING
        if self.current.job.direction is Direction.FINALIZE:  # undo and restore too
            return Running.FINALIZE
        return Running.BACKGROUND_PULL if stops else Running.PULL

    # -- the worker -----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.pending:
                run = self.pending.pop(0)
                self.current = run
                try:
                    await self._execute(run)
                except Exception as exc:  # a bug here must not stop every later sync
                    log.exception("coordinator failed running %s", run.job)
                    self._finish(run, None, error=exc)
                finally:
                    self.current = None
            self._idle.set()

    async def _execute(self, run: Run) -> None:
        job = run.job
        if run.work is not None:
            await self._execute_work(run, run.work)
            return
        if job.direction is Direction.FINALIZE and not job.dry_run and not self.ready:
            # Queued behind an initial pull that then failed: pushing a folder that was never
            # filled would upload a partial view as if it were the user's work.
            self._finish(run, None, error=Refused(self._not_ready_reason(), retry_later=True))
            return
        run.started_at = self.clock()
        run.progress = Progress(
            operation=str(job.direction), started=run.started_at, phase=NOT_YET_SCANNED
        )
        run.task = asyncio.create_task(
            self.engine.run(job.direction, dry_run=job.dry_run, progress=run.progress),
            name=f"sync-{job.direction}",
        )
        # wait() rather than await: cancelling the sync must not cancel this worker. The
        # samples let the rate (and so the ETA) follow the last seconds, not the average.
        while not run.task.done():
            await asyncio.wait({run.task}, timeout=1.0)
            run.progress.sample(self.clock())
        if run.task.cancelled():
            result = _cancelled_result(job, "cancelled before it finished")
        elif (exc := run.task.exception()) is not None:
            log.error("%s crashed: %r", job, exc, exc_info=exc)
            result = SyncResult(operation=job.direction, dry_run=job.dry_run)
            result.fatal = f"internal error: {exc!r}"
        else:
            self._finish(run, run.task.result())  # the engine logged its summary line
            return
        # The engine never got to log these: one summary line per sync all the same.
        result.seconds = self.clock() - run.started_at
        log.error(result.one_line(), extra={"summary": result.as_dict(), "origin": run.origin})
        self._finish(run, result)

    async def _execute_work(self, run: Run, work: Callable[[], Awaitable[Any]]) -> None:
        """An undo or restore: it logs its own summary line; the syncs' records (last results,
        counters, readiness) are not about it."""
        run.started_at = self.clock()
        run.progress = Progress(
            operation=run.job.operation, started=run.started_at, phase="running"
        )

        async def call() -> Any:
            return await work()

        run.task = asyncio.create_task(call(), name=f"sidecar-{run.job.operation}")
        await asyncio.wait({run.task})
        if run.task.cancelled():
            refused = Refused(f"{run.job} cancelled before it finished", retry_later=True)
            self._finish(run, None, error=refused)
        elif (exc := run.task.exception()) is not None:
            log.error("%s crashed: %r", run.job, exc, exc_info=exc)
            self._finish(run, None, error=Exception(f"{run.job} crashed: {exc!r}"))
        elif not run.future.done():
            run.future.set_result(run.task.result())

    def _finish(
        self,
        run: Run,
        result: SyncResult | None,
        *,
        error: Exception | None = None,
        record: bool = True,
    ) -> None:
        if error is not None:
            if not run.future.done():
                run.future.set_exception(error)
                run.future.exception()  # retrieved: nobody awaiting is not an error here
            return
        assert result is not None
        finished = self.wall()
        summary = result.as_dict()
        summary["finished_at"] = finished
        summary["origin"] = run.origin
        summary["outcome"] = outcome(result)
        summary["summary"] = result.one_line()
        if record:
            self.last_results[str(run.job.direction) + ("_dry_run" if run.job.dry_run else "")] = (
                summary
            )
            if not result.ok:
                self.last_error = {
                    "operation": str(run.job.direction),
                    "at": finished,
                    "message": _error_message(result),
                }
            self.counters.record(result, finished)
            _log_details(run, result)
            if run.job == Job(Direction.PULL):
                self._note_pull(result, finished)
        if not run.future.done():
            run.future.set_result(result)

    def _note_pull(self, result: SyncResult, finished: float) -> None:
        verdict = pull_verdict(result, self._pull_problems)
        if result.fatal is None:
            self._pull_problems = problems(result)
        if verdict is PullVerdict.RETRY:
            return  # ready or not, nothing new is known about the folder
        was_degraded = self.degraded is not None
        self.degraded = None if verdict is PullVerdict.CLEAN else _degraded(result, finished)
        self._degraded_errors = frozenset(result.errors if self.degraded else ())
        if self.degraded is not None:
            log.warning(
                "%s: %s",
                "ready, degraded" if not self.ready else "degraded",
                self.degraded["message"],
                extra={"degraded": self.degraded},
            )
        elif was_degraded:
            log.info("no longer degraded: a pull applied everything")
        if not self.ready:
            self.ready = True
            self._ready_event.set()

    def only_known_problems(self, result: SyncResult) -> bool:
        """True when a sync failed only on paths the daemon is already degraded by (bad keys
        in the bucket): everything of its own was done."""
        return (
            result.fatal is None
            and result.deletes_blocked is None
            and bool(result.errors)
            and self._degraded_errors.issuperset(result.errors)
        )

    def _pull_may_make_ready(self) -> bool:
        return self.ready or any(
            run.job == Job(Direction.PULL) for run in [*self.pending, self.current] if run
        )

    def _not_ready_reason(self) -> str:
        reason = "finalize refused: the initial pull has not succeeded yet"
        if self.last_error is not None:
            reason += f" (last error: {self.last_error['message']})"
        return reason + "; pushing a folder that was never filled could overwrite newer data"


def _current(run: Run, progress: Progress, now: float) -> dict[str, Any]:
    """/status's `current`: the running sync's progress, or the undo or restore that runs."""
    current = {
        **progress.as_dict(now),
        "line": progress.line(now),
        "dry_run": run.job.dry_run,
        "origin": run.origin,
        "requesters": run.requesters,
    }
    if run.job.work:
        # It counts no files nor bytes: say what it undoes or restores instead of "0/0 files".
        current["work"] = run.job.work
        current["line"] = f"{run.job}: running for {format_duration(now - progress.started)}"
    return current


def _degraded(result: SyncResult, finished: float) -> dict[str, Any]:
    """The record of what a pull left out: for /status, the log and /readyz's text."""
    paths = {error.path for error in result.errors}  # one path may have several errors
    parts = []
    if result.errors:
        parts.append(f"{len(paths)} path(s) skipped (first: {result.errors[0]})")
    if result.deletes_blocked:
        parts.append(result.deletes_blocked)
    return {
        "since": finished,
        "message": "; ".join(parts) or "the pull reported problems",
        "skipped_count": len(paths),
        "skipped": [error.as_dict() for error in result.errors[:MAX_LOGGED_ERRORS]],
        "deletes_withheld": result.deletes_blocked,
    }


def _cancelled_result(job: Job, reason: str) -> SyncResult:
    result = SyncResult(operation=job.direction, dry_run=job.dry_run)
    result.fatal = f"cancelled: {reason}"
    return result


def _error_message(result: SyncResult) -> str:
    if result.fatal:
        return result.fatal
    if result.deletes_blocked:
        return result.deletes_blocked
    first = result.errors[0] if result.errors else None
    more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
    return f"{first}{more}" if first else "failed"


def _log_details(run: Run, result: SyncResult) -> None:
    """Conflicts and file errors by name, one line each (the summary line counts them)."""
    for conflict in result.conflicts:
        log.warning(
            "conflict on %s: %s, %s",
            conflict.path,
            conflict.kind,
            conflict.resolution,
            extra={"conflict": conflict.as_dict(), "origin": run.origin},
        )
    for error in result.errors[:MAX_LOGGED_ERRORS]:
        log.error("%s: %s", run.job.direction, error, extra={"file_error": error.as_dict()})
    if len(result.errors) > MAX_LOGGED_ERRORS:
        hidden = len(result.errors) - MAX_LOGGED_ERRORS
        log.error("%s: %d more file errors (see /status)", run.job.direction, hidden)


def _inflight_budget(engine: Engine) -> dict[str, int] | None:
    """The S3 in-flight budget (SyncEngine.inflight_budget); None for test doubles."""
    return getattr(engine, "inflight_budget", None)


def _fleet_status(engine: Engine) -> dict[str, Any]:
    """Shard, limits and time waited on them (SyncEngine.fleet_status); engines without
    them (the coordinator's test doubles) report none."""
    fleet = getattr(engine, "fleet_status", None)
    return fleet() if fleet is not None else {}
