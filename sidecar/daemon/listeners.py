"""The two HTTP listeners, guarded so that no client can take what the sync needs.

aiohttp's server has no deadline for reading a request (its keep-alive timer only runs
between requests, and for a fresh connection only in recent versions) and no cap on
connections: 1,100 half-sent requests on the probe port once took every fd of the process,
so the final push failed with EMFILE. Each listener therefore gets a `ConnectionGuard`:

- A cap on open connections, sized from RLIMIT_NOFILE so that, whatever clients do, the
  fds the sync needs stay free. At the cap a new connection evicts the oldest one that is not
  running a handler (idle keep-alive, or still sending its request), so a fresh probe still
  gets in; only when every connection is running a handler is the new one closed at once.
- A read deadline: a connection must deliver a whole request, body included, within
  `READ_TIMEOUT` of connecting or of its previous answer, else it is closed. A running
  handler (a long /finalize, a progress stream) is never cut.
- `shed()`: at shutdown, close every connection that is not running a handler and lower the
  cap, so the final push is never short of fds.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.daemon.web import Handler

log = logging.getLogger("sidecar.listeners")

READ_TIMEOUT = 10.0  # seconds to send a whole request (kubelet and curl need milliseconds)
BACKLOG = 32  # also how many connections asyncio accepts in one go
MAX_CONNECTIONS = 256  # per listener; a pod sees a handful
MIN_CONNECTIONS = 8
SHUTDOWN_CONNECTIONS = 8  # per listener once the final push runs: probes and a preStop hook
# fds kept for the sync itself: S3 connections and open files (both bounded by
# --concurrency), the state journal, the watcher, logs and the interpreter's own.
FD_RESERVE_BASE = 64
FD_RESERVE_PER_REQUEST = 2
SHED_LOG_INTERVAL = 10.0


def connection_cap(concurrency: int, listeners: int = 2) -> int:
    """Connections per listener that leave the sync its fds under this process's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    reserve = FD_RESERVE_BASE + FD_RESERVE_PER_REQUEST * concurrency
    # Each listener may hold its cap plus one accept burst (the backlog) at a time.
    room = (soft - reserve) // listeners - BACKLOG
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, room))


@dataclass(eq=False)
class _Connection:
    transport: asyncio.Transport
    opened: float
    busy: int = 0  # handlers running on it
    deadline: asyncio.TimerHandle | None = None


@dataclass
class ConnectionGuard:
    """Cap and read deadline for one listener (see the module docstring)."""

    name: str
    limit: int
    read_timeout: float = READ_TIMEOUT
    clock: Callable[[], float] = time.monotonic
    shed_total: dict[str, int] = field(
        default_factory=lambda: {"timeout": 0, "evicted": 0, "refused": 0, "shutdown": 0}
    )
    _open: dict[asyncio.BaseTransport, _Connection] = field(default_factory=dict)
    _unlogged: int = 0
    _logged_at: float = float("-inf")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def busy_connections(self) -> int:
        """Connections running a handler: the ones shed() and eviction leave alone."""
        return sum(1 for connection in self._open.values() if connection.busy)

    def protocol_factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        return lambda: _GuardedProtocol(self, make())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while a handler runs: the read deadline is off then."""
        connection = self._open.get(request.transport) if request.transport else None
        if connection is None:
            return await handler(request)
        if request.body_exists:
            # Still under the read deadline and evictable: a body sent slowly on purpose
            # must not make the connection one that is never shed.
            await request.read()
        connection.busy += 1
        self._disarm(connection)
        try:
            return await handler(request)
        finally:
            connection.busy -= 1
            if connection.busy == 0 and connection.transport in self._open:
                self._arm(connection)

    def shed(self, limit: int = SHUTDOWN_CONNECTIONS) -> int:
        """Close every connection not running a handler and lower the cap; how many closed."""
        self.limit = min(self.limit, limit)
        idle = [c for c in self._open.values() if c.busy == 0]
        for connection in idle:
            self._drop(connection, "shutdown")
        return len(idle)

    # -- called by _GuardedProtocol ------------------------------------------------------

    def admit(self, transport: asyncio.Transport) -> bool:
        if len(self._open) >= self.limit:
            idle = [c for c in self._open.values() if c.busy == 0]
            if not idle:
                self._count("refused")
                return False
            self._drop(min(idle, key=lambda c: c.opened), "evicted")
        connection = _Connection(transport, self.clock())
        self._open[transport] = connection
        self._arm(connection)
        return True

    def forget(self, transport: asyncio.BaseTransport) -> None:
        connection = self._open.pop(transport, None)
        if connection is not None:
            self._disarm(connection)

    # -- internals ---------------------------------------------------------------------

    def _arm(self, connection: _Connection) -> None:
        self._disarm(connection)
        connection.deadline = asyncio.get_running_loop().call_later(
            self.read_timeout, self._expire, connection
        )

    def _disarm(self, connection: _Connection) -> None:
        if connection.deadline is not None:
            connection.deadline.cancel()
            connection.deadline = None

    def _expire(self, connection: _Connection) -> None:
        connection.deadline = None
        if connection.busy == 0 and connection.transport in self._open:
            self._drop(connection, "timeout")

    def _drop(self, connection: _Connection, reason: str) -> None:
        # abort, not close: the fd must come back now, whatever the peer does.
        self.forget(connection.transport)
        connection.transport.abort()
        self._count(reason)

    def _count(self, reason: str) -> None:
        self.shed_total[reason] += 1
        self._unlogged += 1
        now = self.clock()
        if now - self._logged_at >= SHED_LOG_INTERVAL:  # one line per interval, not per peer
            log.warning(
                "%s: closed %d connection(s) since the last report (totals: %s); "
                "at most %d open, %gs to send a request",
                self.name,
                self._unlogged,
                ", ".join(f"{k} {v}" for k, v in self.shed_total.items()),
                self.limit,
                self.read_timeout,
                extra={"listener": self.name, "shed_total": dict(self.shed_total)},
            )
            self._unlogged, self._logged_at = 0, now


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's per-connection protocol, with the guard told of each open and close."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._guard.admit(transport):
            transport.abort()
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.forget(self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ConnectionGuard."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
