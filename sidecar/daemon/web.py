"""The two HTTP apps: control (loopback, may start syncs) and probes (read-only, pod port).

Control app: POST /pull, POST /finalize, GET /status; GET /history, POST /undo?sync=ID,
POST /restore?path=P&at=TIME (issue 14).
    ?wait=false    answer 202 at once with where to watch
    ?progress=1    stream one progress line per second, then the JSON summary (always 200:
                   the status line is sent before the outcome is known; read "ok")
    ?dry_run=1     plan only
    200 ok, 409 refused by configuration (read-only), 503 not now (not ready, shutting down),
    500 the sync ran and failed (the summary names each error), 4xx for bad requests.
Probe app: GET /healthz, /readyz, /status, /metrics. No route on it changes anything.

Both apps answer for one daemon (`Service`, the SidecarService of service.py): readiness and
status are its answers, the handlers only render them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from sidecar.core.model import Direction
from sidecar.core.result import SyncResult
from sidecar.daemon.coordinator import Coordinator, Refused, Ticket
from sidecar.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.daemon.metrics import Metrics
from sidecar.daemon.policy import Readiness
from sidecar.daemon.pullqueue import PriorityPull

# Requests carry everything in the query string; a body is tolerated (curl -d '') but small.
MAX_BODY = 4096
BODY_TIMEOUT = 10.0  # seconds to send that body; a client that trickles it is cut off
PROGRESS_INTERVAL = 1.0
BAR_WIDTH = 24


class Service(Protocol):
    """What the apps ask of the daemon (service.SidecarService)."""

    @property
    def coordinator(self) -> Coordinator: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def priority(self) -> PriorityPull: ...  # GET /wait

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> Readiness: ...


SERVICE = web.AppKey("service", Service)
WATCH_HINT = web.AppKey("watch_hint", str)

_SYNC_PARAMS = frozenset({"wait", "progress", "dry_run"})
_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@web.middleware
async def loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The control listener binds 127.0.0.1 by default; this holds even if someone binds it
    # to 0.0.0.0 by mistake: syncs can only be started from inside the pod.
    if not is_loopback(request.remote):
        return _error(403, f"the control API only answers loopback clients, not {request.remote}")
    return await handler(request)


@web.middleware
async def strict_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    allowed = _ALLOWED_PARAMS.get(route.handler, frozenset())
    unknown = sorted(set(request.query) - allowed)
    if unknown and request.match_info.http_exception is None:
        known = ", ".join(sorted(allowed)) or "none"
        return _error(400, f"unknown query parameter(s): {', '.join(unknown)} (known: {known})")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, f"request body of {request.content_length} bytes; limit {MAX_BODY}")
    if request.body_exists:
        # Chunked bodies have no Content-Length: read() stops at client_max_size with a 413.
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                await request.read()
        except TimeoutError:
            return _error(408, f"the request body did not arrive within {BODY_TIMEOUT:g}s")
    return await handler(request)


# The query parameters each handler takes (_params); weak: an app's handlers go with it.
_ALLOWED_PARAMS: weakref.WeakKeyDictionary[Handler, frozenset[str]] = weakref.WeakKeyDictionary()


def _params(names: frozenset[str]) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        _ALLOWED_PARAMS[handler] = names
        return handler

    return mark


def _flag(request: web.Request, name: str, default: bool) -> bool:
    if name not in request.query:
        return default
    value = request.query[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise web.HTTPBadRequest(
        text=json.dumps({"error": f"{name}={request.query[name]!r} is not a boolean (1 or 0)"}),
        content_type="application/json",
    )


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    # Indented, newline-terminated: the answers are read by people running curl.
    return web.Response(
        text=json.dumps(data, indent=2) + "\n", status=status, content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def _refused(exc: Refused) -> web.Response:
    return _json({"ok": False, "refused": exc.reason}, status=503 if exc.retry_later else 409)


def summary_body(result: SyncResult, ticket: Ticket) -> dict[str, Any]:
    return {**result.as_dict(), "summary": result.one_line(), "joined": ticket.state == "joined"}


def _summary_status(result: SyncResult) -> int:
    return 200 if result.ok else 500


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = max(0, min(width, int(fraction * width)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _progress_line(coordinator: Coordinator, ticket: Ticket) -> str:
    run = ticket.run
    if run.progress is None:
        ahead = coordinator.running_operation()
        return f"{run.job}: " + (f"waiting for {ahead} to finish" if ahead else "starting")
    now = coordinator.clock()
    progress = run.progress
    fraction = progress.bytes_done / progress.bytes_total if progress.bytes_total else 0.0
    return f"{progress_bar(fraction)} {progress.line(now)}"


# -- control app ------------------------------------------------------------------------------


def _sync_handler(direction: Direction) -> Handler:
    @_params(_SYNC_PARAMS)
    async def handle(request: web.Request) -> web.StreamResponse:
        wait = _flag(request, "wait", True)
        stream = _flag(request, "progress", False)
        dry_run = _flag(request, "dry_run", False)
        coordinator = request.app[SERVICE].coordinator
        try:
            ticket = coordinator.submit(direction, dry_run=dry_run)
        except Refused as exc:
            return _refused(exc)
        if not wait:
            return _json(
                {
                    "accepted": True,
                    "operation": str(direction),
                    "dry_run": dry_run,
                    "state": ticket.state,
                    "watch": request.app[WATCH_HINT],
                },
                status=202,
            )
        if stream:
            return await _stream(request, coordinator, ticket)
        try:
            result = await ticket.result()
        except Refused as exc:
            return _refused(exc)
        body = summary_body(result, ticket)
        if direction is Direction.PULL:
            body["degraded"] = coordinator.degraded is not None
        return _json(body, status=_summary_status(result))

    return handle


async def progress_stream(
    request: web.Request,
    waiter: asyncio.Future[Any],
    line: Callable[[], str],
    final: Callable[[], dict[str, Any]],
) -> web.StreamResponse:
    """A plain-text answer of progress lines until `waiter` is done, then `final()` as one
    JSON line (the progress=1 answers of /pull, /finalize and /wait)."""
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"},
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        # A first line at once (so a terminal shows something), then one per interval.
        while not waiter.done():
            await response.write((line() + "\n").encode())
            await asyncio.wait({waiter}, timeout=PROGRESS_INTERVAL)
    finally:
        if not waiter.done():
            waiter.cancel()  # the client left (a shielded sync goes on for the others)
    await response.write((json.dumps(final()) + "\n").encode())
    await response.write_eof()
    return response


async def _stream(
    request: web.Request, coordinator: Coordinator, ticket: Ticket
) -> web.StreamResponse:
    waiter = asyncio.ensure_future(ticket.result())

    def final() -> dict[str, Any]:
        try:
            return summary_body(waiter.result(), ticket)
        except Refused as exc:
            return {"ok": False, "refused": exc.reason}

    return await progress_stream(
        request, waiter, lambda: _progress_line(coordinator, ticket), final
    )


@_params(frozenset())
async def status_handler(request: web.Request) -> web.Response:
    return _json(request.app[SERVICE].status())


# -- history, undo, restore (issue 14) --------------------------------------------------------


def _undoer(request: web.Request) -> Any:
    """The engine, for history/undo/restore."""
    coordinator = request.app[SERVICE].coordinator
    if request.method == "POST" and coordinator.read_only:
        raise web.HTTPConflict(
            text=json.dumps({"ok": False, "refused": "this sidecar runs with --read-only"}),
            content_type="application/json",
        )
    return coordinator.engine


@_params(frozenset({"limit"}))
async def history_handler(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _error(400, f"limit={request.query['limit']!r} is not a number")
    records, problems = await _undoer(request).history(limit)
    return _json({"syncs": [r.summary() for r in records], "problems": problems})


async def _take_turn(
    request: web.Request, name: str, dry_run: bool, work: Callable[[], Awaitable[Any]]
) -> web.Response:
    """Undo and restore take the sync locks: they queue behind the running sync like a
    /finalize behind a /pull, instead of waiting on the lock beside the coordinator."""
    coordinator = request.app[SERVICE].coordinator
    try:
        ticket = coordinator.submit_work(name, work, dry_run=dry_run)
        return _report(await ticket.run.outcome())
    except Refused as exc:
        return _refused(exc)


def _report(report: Any) -> web.Response:
    body = report.as_dict()
    if report.fatal and report.fatal.startswith("no sync "):
        return _json(body, status=404)
    return _json(body, status=200 if report.ok else 500)


@_params(frozenset({"sync", "dry_run", "force"}))
async def undo_handler(request: web.Request) -> web.Response:
    sync_id = request.query.get("sync", "")
    if not sync_id:
        return _error(400, "which sync? POST /undo?sync=SYNC_ID (GET /history lists them)")
    engine = _undoer(request)
    dry_run, force = _flag(request, "dry_run", False), _flag(request, "force", False)
    return await _take_turn(
        request,
        f"undo {sync_id}",
        dry_run,
        lambda: engine.undo(sync_id, dry_run=dry_run, force=force),
    )


@_params(frozenset({"path", "at", "local", "dry_run"}))
async def restore_handler(request: web.Request) -> web.Response:
    from sidecar.core.backup import parse_utc

    try:
        at = parse_utc(request.query.get("at", ""))
    except ValueError as exc:
        return _error(400, f"at: {exc}")
    path = request.query.get("path", "").strip("/")
    engine = _undoer(request)
    local, dry_run = _flag(request, "local", False), _flag(request, "dry_run", False)
    path = "" if path == "." else path
    return await _take_turn(
        request,
        f"restore {path or '.'}",
        dry_run,
        lambda: engine.restore(path, at, local=local, dry_run=dry_run),
    )


def control_app(service: Service, *, watch_hint: str = "GET /status") -> web.Application:
    from sidecar.daemon.waitapi import wait_handler  # issue 13: GET /wait (it imports this module)

    app = web.Application(middlewares=[loopback_only, strict_requests], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[WATCH_HINT] = watch_hint
    app.router.add_post("/pull", _sync_handler(Direction.PULL))
    app.router.add_post("/finalize", _sync_handler(Direction.FINALIZE))
    app.router.add_get("/status", status_handler)
    app.router.add_get("/wait", wait_handler)
    app.router.add_get("/history", history_handler)
    app.router.add_post("/undo", undo_handler)
    app.router.add_post("/restore", restore_handler)
    return app


# -- probe app --------------------------------------------------------------------------------


@_params(frozenset())
async def healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop turns; a wedged loop times the probe out.
    return web.Response(text="ok\n")


@_params(frozenset())
async def readyz(request: web.Request) -> web.Response:
    answer = request.app[SERVICE].readiness()
    return web.Response(status=answer.status, text=answer.text + "\n")


@_params(frozenset())
async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[SERVICE].metrics.render().encode(),
        headers={"Content-Type": METRICS_CONTENT_TYPE},
    )


def probe_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[strict_requests], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app
