"""`sidecar serve`: the daemon, one `SidecarService` around one coordinator.

Design (issue 17): one object owns the daemon's life and answers for it once.
- `SidecarService` is built from the settings and the engine, and builds each part with its
  collaborators given at construction, nothing wired afterwards: the coordinator (it counts
  every finished sync), /wait and --ready-when priority's background pull, the initial pull,
  auto-sync, the listeners' connection guards, then the metrics, which read all of these
  (`Metrics.of`).
- It is the one place that answers readiness (`readiness()`, GET /readyz) and status
  (`status()`, GET /status on both listeners); the aiohttp apps (web.py) render its answers.
- Start (`run`): both listeners, then the initial pull (`InitialPull`): retried with backoff
  while it cannot run through (server down, credentials, ...); ready once it applied
  everything it safely could, degraded when that left some paths out (see
  `coordinator.pull_verdict`). Auto-sync and the background pull start with it.
- Stop on SIGTERM/SIGINT (`stop`): the decisions are values from policy.py (`plan_stop`,
  `running_fate`, `push_end`, `exit_code`), tested as tables; this module carries them out:
  a final finalize bounded by --shutdown-timeout; a second signal or the deadline cancels
  it (the engine never makes a half-written object current) and the log names what was not
  pushed.

Exit codes: 0 after a clean stop (final push done, or nothing to push), 1 when the final push
failed or was cut short (so the pod's last state shows it), 2 for an address it cannot bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.core.model import Direction
from sidecar.core.options import ServeConfig, SyncConfig
from sidecar.core.priority import PriorityRules
from sidecar.core.progress import Progress
from sidecar.core.result import SyncResult
from sidecar.core.units import format_bytes
from sidecar.daemon.autosync import AutoSync
from sidecar.daemon.coordinator import Coordinator, Job, Refused
from sidecar.daemon.listeners import ConnectionGuard, GuardedSite, connection_cap
from sidecar.daemon.metrics import Metrics
from sidecar.daemon.policy import (
    EXIT_CANNOT_LISTEN,
    EXIT_OK,
    EXIT_PUSH_INCOMPLETE,
    INITIAL_RETRY_FIRST,
    AtStop,
    OnSignal,
    PushEnd,
    Readiness,
    StopPlan,
    cut_short_reason,
    exit_code,
    initial_retry,
    lists_unpushed,
    on_signal,
    plan_stop,
    push_end,
    readiness,
)
from sidecar.daemon.pullqueue import PriorityPull
from sidecar.daemon.web import control_app, probe_app

log = logging.getLogger("sidecar.serve")

__all__ = ["EXIT_CANNOT_LISTEN", "EXIT_OK", "EXIT_PUSH_INCOMPLETE", "SidecarService", "run_serve"]

CANCEL_GRACE = 15.0  # how long a cancelled sync may take to unwind
UNPUSHED_LISTING_BUDGET = 5.0  # after the deadline, time to name what was not pushed
MAX_LOGGED_PATHS = 50


class ListenError(RuntimeError):
    pass


def run_serve(config: ServeConfig) -> int:
    from sidecar.engine.sync import SyncEngine

    try:
        return asyncio.run(serve(config, SyncEngine))
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LISTEN


async def serve(config: ServeConfig, engine_factory: Callable[[SyncConfig], Any]) -> int:
    started, started_wall = time.monotonic(), time.time()
    loop = asyncio.get_running_loop()
    signals = Signals()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.fire, signum)
    async with (
        engine_factory(config.sync) as engine,
        SidecarService(config, engine, started=started, started_wall=started_wall) as service,
    ):
        return await service.run(signals)


@dataclass
class Signals:
    """SIGTERM/SIGINT: the first starts the shutdown, the second hurries it."""

    count: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    second: asyncio.Event = field(default_factory=asyncio.Event)

    def fire(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if on_signal(self.count) is OnSignal.STOP:
            log.info("%s received: final push, then exit", name)
            self.first.set()
        else:
            log.warning("%s received again: cancelling the final push", name)
            self.second.set()


@dataclass
class InitialPull:
    """Pull until one applies everything it safely can; until then not ready, saying why."""

    coordinator: Coordinator
    clock: Callable[[], float] = time.monotonic
    attempts: int = 0
    state: str = "starting"
    next_retry_at: float | None = None

    def retry_in(self) -> float | None:
        """Seconds until the next attempt, while waiting for one."""
        if self.next_retry_at is None:
            return None
        return round(max(0.0, self.next_retry_at - self.clock()), 1)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "attempts": self.attempts,
            "next_retry_in_seconds": self.retry_in(),
        }

    async def run(self) -> None:
        delay = INITIAL_RETRY_FIRST
        while not self.coordinator.ready:
            self.attempts += 1
            self.state = "running"
            self.next_retry_at = None
            try:
                ticket = self.coordinator.submit(Direction.PULL, origin="initial")
            except Refused:
                self.state = "abandoned"
                return
            result = await ticket.result()
            if self.coordinator.ready:
                break
            if self.coordinator.closing:
                self.state = "abandoned"
                return
            fatal = result.fatal is not None
            base, delay = initial_retry(delay, fatal=fatal)
            # Ran through but hit problems not seen before: they may be passing.
            why = (
                result.fatal
                if result.fatal is not None
                else f"{_problems_line(result)} while files were still arriving"
            )
            # Jitter so many pods restarted together do not retry in lockstep.
            wait = base * random.uniform(0.8, 1.2)
            self.state = "retrying"
            self.next_retry_at = self.clock() + wait
            log.error(
                "initial pull %s (attempt %d): %s; retrying in %.0fs",
                "failed" if fatal else "not settled",
                self.attempts,
                why,
                wait,
                extra={"attempt": self.attempts, "retry_in_seconds": round(wait, 1)},
            )
            await asyncio.sleep(wait)
        self.state = "done, degraded" if self.coordinator.degraded else "done"
        self.next_retry_at = None
        if self.coordinator.degraded:
            log.warning(
                "initial pull done after %d attempt(s): ready, degraded: %s",
                self.attempts,
                self.coordinator.degraded["message"],
            )
        else:
            log.info("initial pull done after %d attempt(s): ready", self.attempts)


class SidecarService:
    """The daemon: owns the initial pull, auto-sync, the background pull and the stop, and
    answers readiness and status. Use as `async with` (the coordinator's worker), then `run`."""

    def __init__(
        self,
        config: ServeConfig,
        engine: Any,
        *,
        started: float | None = None,  # time.monotonic() at the start, for time-to-ready
        started_wall: float | None = None,  # time.time() at the start, for the metrics
    ) -> None:
        self.config = config
        self.started = time.monotonic() if started is None else started
        self.time_to_ready: float | None = None
        # preempt: the background pull (built next, it needs the coordinator) stops early for
        # a request that waits behind it.
        self.coordinator = Coordinator(engine, read_only=config.read_only, preempt=self._preempt)
        self.priority = _priority_pull(config, self.coordinator, engine, self.started)
        self.initial = InitialPull(self.coordinator)
        self.autosync = _auto_sync(config, self.coordinator, self.priority)
        cap = connection_cap(config.sync.concurrency)
        self.guards = (ConnectionGuard("control API", cap), ConnectionGuard("probes", cap))
        self.metrics = Metrics.of(
            self.coordinator,
            volume=config.sync.volume,
            started_at=started_wall,
            http=lambda: self.guards,
            time_to_ready=lambda: self.time_to_ready,
            **_priority_gauges(self.priority),
            **_auto_sync_gauges(self.autosync),
        )

    async def __aenter__(self) -> SidecarService:
        await self.coordinator.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.coordinator.__aexit__(*exc)
        finally:
            self.priority.close()

    def _preempt(self) -> bool:
        return self.priority.enabled and self.priority.preempt()

    # -- the answers ----------------------------------------------------------------------

    def readiness(self) -> Readiness:
        coord = self.coordinator
        return readiness(
            closing=coord.closing,
            ready=coord.ready,
            degraded=None if coord.degraded is None else coord.degraded["message"],
            last_error=None if coord.last_error is None else coord.last_error["message"],
            retry_in=self.initial.retry_in(),
        )

    def status(self) -> dict[str, Any]:
        sync = self.config.sync
        return {
            **self.coordinator.status(),
            "initial_pull": self.initial.status(),
            "background_pull": self.priority.status(),
            "auto_sync": self.autosync.status() if self.autosync else {"enabled": False},
            "remote": sync.remote_url,
            "local_dir": str(sync.local_dir),
            "volume": sync.volume,
        }

    # -- the life -------------------------------------------------------------------------

    async def run(self, signals: Signals) -> int:
        config = self.config
        probe_host, probe_port = split_addr(config.probe_addr)
        watch = f"GET /status here or http://{_local(probe_host)}:{probe_port}/status"
        control, probes = control_app(self, watch_hint=watch), probe_app(self)
        control_guard, probe_guard = self.guards
        runners = [await start_listener(control, config.control_addr, "control API", control_guard)]
        try:
            runners.append(await start_listener(probes, config.probe_addr, "probes", probe_guard))
            log.info(
                "serving %s <-> %s%s%s",
                config.sync.remote_url,
                config.sync.local_dir,
                " (read-only)" if config.read_only else "",
                " (auto-sync)" if self.autosync else "",
            )
            stop_autosync = asyncio.Event()
            tasks = self._start(stop_autosync)
            await signals.first.wait()
            # Idle and half-sent connections go now, and few may come: the push needs fds.
            shed = sum(guard.shed() for guard in self.guards)
            if shed:
                log.info("closed %d idle client connection(s) before the final push", shed)
            stop_autosync.set()
            code = await self.stop(signals)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return code
        finally:
            for runner in reversed(runners):
                await runner.cleanup()

    def _start(self, stop_autosync: asyncio.Event) -> list[asyncio.Task[None]]:
        tasks = [
            asyncio.create_task(self.initial.run(), name="initial-pull"),
            asyncio.create_task(self._time_ready(), name="time-to-ready"),
        ]
        if self.autosync is not None:
            tasks.append(asyncio.create_task(self.autosync.run(stop_autosync)))
        if self.priority.enabled:
            tasks.append(asyncio.create_task(self.priority.keep_pulling(), name="background"))
        return tasks

    async def _time_ready(self) -> None:
        await self.coordinator.wait_ready()
        self.time_to_ready = round(time.monotonic() - self.started, 3)

    # -- the stop: policy.py decides, these carry it out -----------------------------------

    async def stop(self, signals: Signals) -> int:
        """The first signal came: carry out `plan_stop`; the exit code."""
        coord = self.coordinator
        plan = plan_stop(
            AtStop(
                read_only=self.config.read_only,
                ready=coord.ready,
                running=coord.running(stops=self.priority.enabled and self.priority.can_stop()),
                unpushed_changes=self.autosync.pending_changes if self.autosync else 0,
            )
        )
        if plan.final_push:
            return await self._final_push(plan, signals)
        coord.close(plan.close_reason)
        await _bounded(coord.idle(), CANCEL_GRACE)
        coord.refuse_new_work()
        log.info("exiting; %s", plan.why_no_push)
        assert plan.exit_code is not None
        return plan.exit_code

    async def _final_push(self, plan: StopPlan, signals: Signals) -> int:
        coord, timeout = self.coordinator, self.config.shutdown_timeout
        coord.close(plan.close_reason, keep=Job(Direction.FINALIZE))
        ticket = coord.submit(
            Direction.FINALIZE, join_running=False, origin="shutdown", allow_closing=True
        )
        waiter = asyncio.ensure_future(ticket.result())
        hurry = asyncio.ensure_future(signals.second.wait())
        done, _ = await asyncio.wait(
            {waiter, hurry}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        hurry.cancel()
        if waiter in done:
            coord.refuse_new_work()
            result = waiter.result()
            end = push_end(
                finished=True, ok=result.ok, only_known_problems=coord.only_known_problems(result)
            )
            _log_push_end(end, result)
            return exit_code(end)
        reason = cut_short_reason(second_signal=signals.second.is_set(), shutdown_timeout=timeout)
        progress = ticket.run.progress
        coord.close(f"cut short by {reason}", cancel_running=True)
        await _bounded(coord.idle(), CANCEL_GRACE)
        waiter.cancel()
        _log_cut_short(reason, progress)
        if lists_unpushed(signals.count):
            await _log_unpushed(coord)
        coord.refuse_new_work()
        return exit_code(PushEnd.CUT_SHORT)


def _priority_pull(
    config: ServeConfig, coord: Coordinator, engine: Any, started: float
) -> PriorityPull:
    """/wait in any case; with --ready-when priority also the engine's download order."""
    from sidecar.engine.sync import read_syncignore

    priority = PriorityPull(
        coord,
        config.sync.local_dir,
        PriorityRules(config.priority_max_size, config.priority),
        config.sync.multipart_threshold,
        read_syncignore,
        enabled=config.ready_when == "priority",
        started=started,
        # With auto-sync, what the background pull places is not a user change.
        track_own_writes=config.ready_when == "priority" and config.auto_sync,
        # Its queue on disk beside the plan spool (a scripted engine has no state folder).
        spool_dir=getattr(getattr(engine, "state", None), "directory", None),
    )
    if priority.enabled:
        engine.download_order = priority
    return priority


def _auto_sync(config: ServeConfig, coord: Coordinator, priority: PriorityPull) -> AutoSync | None:
    if not config.auto_sync:
        return None
    return AutoSync(
        coord,
        config.sync.local_dir,
        config.auto_sync_debounce,
        config.auto_sync_max_delay,
        own_write=priority.own_write if priority.enabled else None,
    )


def _priority_gauges(priority: PriorityPull) -> dict[str, Any]:
    if not priority.enabled:
        return {}
    return {
        "time_to_complete": lambda: priority.complete_after,
        "background": priority.pending_totals,
    }


def _auto_sync_gauges(autosync: AutoSync | None) -> dict[str, Any]:
    if autosync is None:
        return {}
    return {
        "watching": lambda: autosync.watching,
        "unpushed": lambda: (
            autosync.pending_changes,
            0.0 if autosync.first_change is None else autosync.clock() - autosync.first_change,
        ),
    }


def _log_push_end(end: PushEnd, result: SyncResult) -> None:
    if end is PushEnd.DONE:
        log.info("final push done: %s", result.one_line())
    elif end is PushEnd.KNOWN_PROBLEMS_ONLY:
        # Bad keys in the bucket the daemon was already degraded by: nothing of ours failed.
        log.warning(
            "final push done; the bucket still has keys that were skipped: %s",
            result.one_line(),
        )
    else:
        log.error("final push failed: %s", result.one_line())


def _problems_line(result: SyncResult) -> str:
    found = [f"{len(result.errors)} file error(s)"] if result.errors else []
    return "; ".join([*found, *filter(None, [result.deletes_blocked])]) or "problems"


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start_listener(
    app: web.Application, addr: str, what: str, guard: ConnectionGuard
) -> web.AppRunner:
    app.middlewares.insert(0, guard.middleware)
    # keepalive_timeout: aiohttp's own idle timer agrees with the guard's read deadline.
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=guard.read_timeout, shutdown_timeout=5.0
    )
    await runner.setup()
    host, port = split_addr(addr)
    try:
        await GuardedSite(runner, host, port, guard).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(
            f"cannot listen on {addr} for the {what}: {exc.strerror or exc}"
        ) from None
    log.info(
        "%s listening on %s (at most %d connections, %gs to send a request)",
        what,
        addr,
        guard.limit,
        guard.read_timeout,
        extra={"listener": what, "addr": addr},
    )
    return runner


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _log_cut_short(reason: str, progress: Progress | None) -> None:
    if progress is None:
        log.error("final push never started before %s; local changes were not pushed", reason)
        return
    log.error(
        "final push cancelled by %s after %s of %s; no object was left half-written, "
        "what follows stays only on local disk",
        reason,
        format_bytes(progress.bytes_done),
        format_bytes(progress.bytes_total),
        extra={"bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total},
    )


async def _log_unpushed(coord: Coordinator) -> None:
    """Name the paths still waiting to be pushed: a dry-run finalize, briefly."""
    try:
        ticket = coord.submit(
            Direction.FINALIZE, dry_run=True, origin="shutdown", allow_closing=True
        )
    except Refused:
        return
    result: SyncResult | None = await _bounded(ticket.result(), UNPUSHED_LISTING_BUDGET)
    if result is None:
        coord.cancel_current("listing what was not pushed took too long")
        await _bounded(coord.idle(), CANCEL_GRACE)
        log.error("could not list what was not pushed within %gs", UNPUSHED_LISTING_BUDGET)
        return
    paths = [action.path for action in result.planned]
    for path in paths[:MAX_LOGGED_PATHS]:
        log.error("not pushed: %s", path, extra={"not_pushed": path})
    if len(paths) > MAX_LOGGED_PATHS:
        log.error("not pushed: %d more paths", len(paths) - MAX_LOGGED_PATHS)


async def _bounded(awaitable: Any, seconds: float) -> Any:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(awaitable, seconds)
    return None
