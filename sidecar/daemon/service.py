"""`sidecar serve`: wire engine, coordinator, the two listeners, auto-sync and the lifecycle.

Start: both listeners, then the initial pull: retried with backoff while it cannot run
through (server down, credentials, ...); ready once it applied everything it safely could,
degraded when that left some paths out (see `daemon.pull_verdict`).
Stop on SIGTERM/SIGINT: a final finalize bounded by --shutdown-timeout; a
second signal or the deadline cancels it (the engine never makes a half-written object
current) and the log names what was not pushed.

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
from sidecar.daemon.pullqueue import PriorityPull
from sidecar.daemon.web import control_app, default_readiness, probe_app

log = logging.getLogger("sidecar.serve")

EXIT_OK = 0
EXIT_PUSH_INCOMPLETE = 1
EXIT_CANNOT_LISTEN = 2
INITIAL_RETRY_MAX = 60.0
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


@dataclass
class Signals:
    """SIGTERM/SIGINT: the first starts the shutdown, the second hurries it."""

    count: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    second: asyncio.Event = field(default_factory=asyncio.Event)

    def fire(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
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

    def status(self) -> dict[str, Any]:
        retry_in = None
        if self.next_retry_at is not None:
            retry_in = round(max(0.0, self.next_retry_at - self.clock()), 1)
        return {"state": self.state, "attempts": self.attempts, "next_retry_in_seconds": retry_in}

    async def run(self) -> None:
        delay = 1.0
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
            if result.fatal is None:
                # It ran through, moved files and hit problems not seen before: pull again
                # soon to see whether they last (then: ready, degraded) or were passing.
                delay = 1.0
                why = f"{_problems_line(result)} while files were still arriving"
            else:
                why = result.fatal
            # Jitter so many pods restarted together do not retry in lockstep.
            wait = delay * random.uniform(0.8, 1.2)
            self.state = "retrying"
            self.next_retry_at = self.clock() + wait
            log.error(
                "initial pull %s (attempt %d): %s; retrying in %.0fs",
                "failed" if result.fatal else "not settled",
                self.attempts,
                why,
                wait,
                extra={"attempt": self.attempts, "retry_in_seconds": round(wait, 1)},
            )
            await asyncio.sleep(wait)
            if result.fatal is not None:
                delay = min(delay * 2, INITIAL_RETRY_MAX)
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


async def serve(config: ServeConfig, engine_factory: Callable[[SyncConfig], Any]) -> int:
    started, started_wall = time.monotonic(), time.time()
    loop = asyncio.get_running_loop()
    signals = Signals()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.fire, signum)
    async with engine_factory(config.sync) as engine:
        metrics = Metrics(
            volume=config.sync.volume,
            in_flight=lambda: engine.in_flight,
            retries=lambda: engine.retries_total,
            budget=lambda: engine.inflight_budget,
            fleet=engine.fleet_status,
            started_at=started_wall,
        )
        async with Coordinator(engine, read_only=config.read_only, metrics=metrics) as coord:
            metrics.ready = lambda: coord.ready
            metrics.degraded = lambda: coord.degraded
            metrics.running = coord.running_operation
            priority = _priority_pull(config, coord, engine, started)
            return await Daemon(config, coord, metrics, started, priority).run(signals)


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
    )
    if priority.enabled:
        engine.download_order = priority
        coord.preempt = priority.preempt
    return priority


@dataclass
class Daemon:
    """The parts that live as long as the process, around one coordinator."""

    config: ServeConfig
    coord: Coordinator
    metrics: Metrics
    started: float  # time.monotonic() at the start of `serve`, for time-to-ready
    priority: PriorityPull | None = None  # /wait, and --ready-when priority
    initial: InitialPull = field(init=False)
    autosync: AutoSync | None = field(init=False)

    def __post_init__(self) -> None:
        self.initial = InitialPull(self.coord)
        if self.priority is not None and self.priority.enabled:
            priority = self.priority
            self.metrics.time_to_complete = lambda: priority.complete_after
            self.metrics.background = lambda: (
                len(priority.pending),
                sum(priority.pending.values()),
            )
        self.autosync = None
        if self.config.auto_sync:
            autosync = self.autosync = AutoSync(
                self.coord,
                self.config.sync.local_dir,
                self.config.auto_sync_debounce,
                self.config.auto_sync_max_delay,
            )
            if self.priority is not None and self.priority.enabled:
                autosync.own_write = self.priority.own_write
                self.priority.track_own_writes = True
            self.metrics.watching = lambda: autosync.watching
            self.metrics.unpushed = lambda: (
                autosync.pending_changes,
                0.0 if autosync.first_change is None else autosync.clock() - autosync.first_change,
            )

    def status(self) -> dict[str, Any]:
        sync = self.config.sync
        return {
            **self.coord.status(),
            "initial_pull": self.initial.status(),
            "background_pull": self.priority.status() if self.priority else {"enabled": False},
            "auto_sync": self.autosync.status() if self.autosync else {"enabled": False},
            "remote": sync.remote_url,
            "local_dir": str(sync.local_dir),
            "volume": sync.volume,
        }

    def readiness(self) -> str | None:
        reason = default_readiness(self.coord)()
        retry = self.initial.status()["next_retry_in_seconds"]
        return f"{reason}; retry in {retry}s" if reason and retry is not None else reason

    async def run(self, signals: Signals) -> int:
        config = self.config
        probe_host, probe_port = split_addr(config.probe_addr)
        watch = f"GET /status here or http://{_local(probe_host)}:{probe_port}/status"
        control = control_app(self.coord, status=self.status, watch_hint=watch, waits=self.priority)
        probes = probe_app(self.coord, self.metrics, status=self.status, readiness=self.readiness)
        cap = connection_cap(config.sync.concurrency)
        guards = [ConnectionGuard("control API", cap), ConnectionGuard("probes", cap)]
        self.metrics.http = lambda: guards
        runners = [await start_listener(control, config.control_addr, "control API", guards[0])]
        try:
            runners.append(await start_listener(probes, config.probe_addr, "probes", guards[1]))
            log.info(
                "serving %s <-> %s%s%s",
                config.sync.remote_url,
                config.sync.local_dir,
                " (read-only)" if config.read_only else "",
                " (auto-sync)" if self.autosync else "",
            )
            stop_autosync = asyncio.Event()
            tasks = [
                asyncio.create_task(self.initial.run(), name="initial-pull"),
                asyncio.create_task(self._time_ready(), name="time-to-ready"),
            ]
            if self.autosync is not None:
                tasks.append(asyncio.create_task(self.autosync.run(stop_autosync)))
            if self.priority is not None and self.priority.enabled:
                tasks.append(asyncio.create_task(self.priority.keep_pulling(), name="background"))
            await signals.first.wait()
            # Idle and half-sent connections go now, and few may come: the push needs fds.
            shed = sum(guard.shed() for guard in guards)
            if shed:
                log.info("closed %d idle client connection(s) before the final push", shed)
            stop_autosync.set()
            code = await shutdown(self.coord, config, signals)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return code
        finally:
            for runner in reversed(runners):
                await runner.cleanup()

    async def _time_ready(self) -> None:
        await self.coord.wait_ready()
        self.metrics.time_to_ready = round(time.monotonic() - self.started, 3)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


async def shutdown(coord: Coordinator, config: ServeConfig, signals: Signals) -> int:
    if config.read_only or not coord.ready:
        why = (
            "read-only: nothing is pushed"
            if config.read_only
            else "the initial pull never succeeded: no final push, since a folder that was "
            "never filled must not overwrite the bucket"
        )
        coord.close("shutting down")
        await _bounded(coord.idle(), CANCEL_GRACE)
        coord.closed = True
        log.info("exiting; %s", why)
        return EXIT_OK
    coord.close("shutting down: the final push goes first", keep=Job(Direction.FINALIZE))
    ticket = coord.submit(
        Direction.FINALIZE, join_running=False, origin="shutdown", allow_closing=True
    )
    waiter = asyncio.ensure_future(ticket.result())
    hurry = asyncio.ensure_future(signals.second.wait())
    done, _ = await asyncio.wait(
        {waiter, hurry}, timeout=config.shutdown_timeout, return_when=asyncio.FIRST_COMPLETED
    )
    hurry.cancel()
    if waiter in done:
        coord.closed = True
        result = waiter.result()
        if result.ok:
            log.info("final push done: %s", result.one_line())
            return EXIT_OK
        if coord.only_known_problems(result):
            # Bad keys in the bucket the daemon was already degraded by: nothing of ours failed.
            log.warning(
                "final push done; the bucket still has keys that were skipped: %s",
                result.one_line(),
            )
            return EXIT_OK
        log.error("final push failed: %s", result.one_line())
        return EXIT_PUSH_INCOMPLETE
    reason = (
        "a second signal"
        if signals.second.is_set()
        else f"the --shutdown-timeout of {config.shutdown_timeout:g}s"
    )
    progress = ticket.run.progress
    coord.close(f"cut short by {reason}", cancel_running=True)
    await _bounded(coord.idle(), CANCEL_GRACE)
    waiter.cancel()
    _log_cut_short(reason, progress)
    await _log_unpushed(coord, signals)
    coord.closed = True
    return EXIT_PUSH_INCOMPLETE


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


async def _log_unpushed(coord: Coordinator, signals: Signals) -> None:
    """Name the paths still waiting to be pushed: a dry-run finalize, briefly."""
    if signals.count > 2:
        return
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
