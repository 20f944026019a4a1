"""A lean HTTP/1.1 keep-alive client for the S3 hot path (list, HEAD, GET, PUT, UploadPart).

Why not aiohttp's client: profiled over 1,000 small GETs against `rclone serve s3`, its
ClientSession spent ~260 us of CPU per request (timers, URL objects, multidicts, trace and
cookie hooks), more than all the rest of the work a small-file sync does per file, and importing
it costs a one-shot sync ~120 ms (it builds two SSL contexts at import). S3 answers are plain
HTTP/1.1 (a status line, headers, a Content-Length or chunked body); this module reads them
with one asyncio.BufferedProtocol per connection, and a pool keeps connections alive.

Parsing: answer heads and chunked bodies are parsed by llhttp (through httptools, the parser
uvicorn uses), strictly: a bad status line, header, Content-Length or chunk size (`0x10`,
`1_0`, `-5`) is a ProtocolError. Fixed-length bodies skip the parser: they are received
straight into the caller's buffer (Response.read_into).

Early answers: a server may answer an upload before taking all of it (412, 403, 413...) and
stop reading or close. Sending stops as soon as any answer byte arrives, the answer is read
and returned, and the connection (which still owes the server the rest of the body) is
closed, never reused.

Why a buffered protocol rather than asyncio streams: a large body is received straight into
the caller's buffer (Response.read_into), so a download costs one copy out of the kernel and
one into the file. StreamReader copied every byte twice more on the way (profiled: 0.35 s of
CPU per GiB, a fifth of a 1 GiB pull).

Errors: every failure is an OSError a caller can retry (ConnectError when no connection could
be made, ProtocolError when the server broke an exchange, TimeoutError when it went silent for
the read timeout or the request outlived its deadline), never a half-read response handed back
as if complete.

Deadlines: the read timeout alone lets a server that trickles a byte every few seconds hold a
request forever. So every request must also end (head and body read, both ways) within
`deadline_base + bytes / deadline_rate` of being sent, `bytes` being the request body plus the
answer's body (its Content-Length, or what arrived when it has none). The rate is a floor far
below a healthy link's share per stream (64 KiB/s by default: a 64 MiB part gets 17 min on top
of the base), so only a server that barely moves is cut off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httptools

STAGING_BYTES = 256 * 1024  # per connection: heads, small bodies, and what arrives unasked
PREFETCH_BODY = 256 * 1024  # bodies up to this size are read with the head, in one go
MAX_HEAD_BYTES = 1024 * 1024  # status line + headers; S3 heads are a few hundred bytes
WRITE_SLICE = 1 << 20  # big request bodies are written in slices with drains between
IDLE_SECONDS = 15.0  # kept-alive connections older than this are closed, not reused
DEADLINE_RATE = 64 * 1024  # bytes/s every request must average, beyond its base time


_now = time.monotonic  # the clock of asyncio's default loop, without a loop lookup
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_X509_NAME_MISMATCH = frozenset({62, 64})


class ConnectError(ConnectionError):
    """No connection could be made (refused, unresolvable, TLS failure, connect timeout).

    `permanent`: trying again cannot help (the server's certificate is not trusted).
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class ProtocolError(ConnectionError):
    """The server broke the exchange: closed early or answered with something not HTTP/1.1."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: https targets are tunnelled with CONNECT, http ones are sent to it
    in absolute form. `authorization` is a Proxy-Authorization header value, if any."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


class AnswerLost(ProtocolError):
    """The connection ended after the whole request was sent, before any byte of the answer:
    the server may have applied it. Raised instead of a silent resend for a request that is
    not safe to apply twice (see ConnectionPool.request): the caller's retry is then a
    visible one, and it can check what the server now holds."""


class _EarlyAnswer(Exception):
    """The server began answering before the whole request was sent."""


class _StaleConnection(Exception):
    """A reused connection turned out closed before any byte of the answer arrived.
    `sent`: the whole request had been handed over (the server may have applied it)."""

    def __init__(self, sent: bool) -> None:
        super().__init__()
        self.sent = sent


# Resent transparently when the answer was lost: applying them twice is applying them once
# (RFC 9110 9.2.2). A precondition (If-Match, If-None-Match) breaks that for PUT and DELETE:
# the second answer would be about the first (412), so those are never resent blind.
_SAFE_METHODS = frozenset({"GET", "HEAD"})
_IDEMPOTENT_METHODS = frozenset({"PUT", "DELETE"})
_PRECONDITIONS = frozenset({"if-match", "if-none-match", "if-unmodified-since"})


def replayable(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request the server may already have applied can be sent again blind."""
    if method in _SAFE_METHODS:
        return True
    if method not in _IDEMPOTENT_METHODS:
        return False
    return not any(name.lower() in _PRECONDITIONS for name in headers)


def _staging(size: int) -> mmap.mmap:
    """A connection's staging buffer: anonymous memory whose pages count only once touched.
    A bytearray is zero-filled at creation, so each connection cost its whole 256 KiB of RSS:
    +40 MiB for a pull at 256 in flight, where a small GET touches ~20 KiB of it."""
    return mmap.mmap(-1, size)


# Connections opened ahead by connect_early(), by (host, port): when each was started, and
# the socket or the reason it could not be made.
_early: dict[tuple[str, int], list[tuple[float, concurrent.futures.Future[socket.socket]]]] = {}


def connect_early(host: str, port: int, timeout: float, count: int = 1) -> None:
    """Start opening `count` TCP connections to host:port now, each on a thread of its own:
    the first ConnectionPool to that address takes them for its first requests instead of
    paying a handshake's round trip each then. A one-shot sync calls this before its imports
    and set-up (~60 ms of CPU before the first request), which then overlap the handshakes:
    a round trip of a WAN, not the ~0.1 ms of loopback. Names are resolved there too."""
    opened = _early.setdefault((host, port), [])
    for _ in range(count):
        future: concurrent.futures.Future[socket.socket] = concurrent.futures.Future()
        opened.append((time.monotonic(), future))
        threading.Thread(
            target=_connect_into, args=(future, host, port, timeout), daemon=True
        ).start()


def _connect_into(
    future: concurrent.futures.Future[socket.socket], host: str, port: int, timeout: float
) -> None:
    try:
        future.set_result(socket.create_connection((host, port), timeout))
    except OSError as exc:
        future.set_exception(exc)


async def _take_early(host: str, port: int) -> socket.socket | None:
    """A connection connect_early() opened to host:port, if there is one still fit to carry
    a request: made, not older than IDLE_SECONDS and not closed by the server since (a sync
    that waited long for its lock). Otherwise None: connect as usual."""
    opened = _early.get((host, port))
    if not opened:
        return None
    started, future = opened.pop(0)
    if not opened:
        del _early[(host, port)]
    try:
        sock = await asyncio.wrap_future(future)
    except OSError:
        return None  # the usual connect says why, in its own words
    readable, _, _ = select.select([sock], [], [], 0)
    if time.monotonic() - started > IDLE_SECONDS or readable:  # readable here: closed
        sock.close()
        return None
    return sock


class _Connection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection: bytes land in a staging buffer, or straight in the
    buffer a read_into() caller is waiting on."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = _staging(STAGING_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0  # unread staged bytes are _buffer[_start:_end]
        self._end = 0
        self._target: memoryview | None = None  # a read_into() caller's buffer
        self._received = 0  # bytes landed in _target
        self._fill = False  # the reader wakes only once _target is full (or the stream ends)
        self._waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self._lost: BaseException | None = None
        self._timed_out = ""  # why the waiting read or write was cut off, once it was
        self.last_activity = 0.0  # loop time of the last byte either way, or of a wait's start
        self.idle_since = 0.0
        # The request in flight: when it must end by (before counting the answer's body),
        # the answer's body size when announced, and the bytes received so far.
        self.deadline = 0.0
        self.expected_in = 0
        self.received_in = 0

    # ---- asyncio's side --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._received :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):  # room only at the front: move the rest there
            unread = self._end - self._start
            self._buffer[:unread] = self._buffer[self._start : self._end]
            self._start, self._end = 0, unread
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_activity = _now()
        self.received_in += nbytes
        if self._target is not None:
            self._received += nbytes
            if self._received == len(self._target):
                self._target = None  # full: anything more waits in the staging buffer
            elif self._fill:
                return  # no wake-up per segment: the reader wants the whole buffer
        else:
            self._end += nbytes
            if self._end - self._start == len(self._buffer) and self.transport is not None:
                self.transport.pause_reading()  # nobody reads: stop taking bytes in
                self._read_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc or ConnectionResetError("the server closed the connection")
        self._wake()
        writer = self._write_waiter
        if writer is not None and not writer.done():
            writer.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self.last_activity = _now()
        self._write_paused = False
        writer = self._write_waiter
        if writer is not None and not writer.done():
            writer.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        writer = self._write_waiter  # an upload waiting to send more: an early answer
        if writer is not None and not writer.done():
            writer.set_result(None)

    def begin(self, now: float, allowed: float) -> None:
        """A request goes out on this connection and must end within `allowed` seconds
        (plus the answer's body at the deadline rate)."""
        self.deadline = now + allowed
        self.expected_in = 0
        self.received_in = 0

    def why_stuck(self, now: float, timeout: float, rate: float) -> str:
        """Why a request waiting on the server must be cut off now; "" while it may go on:
        no byte either way for `timeout` seconds, or past its deadline."""
        if self._waiter is None and self._write_waiter is None:
            return ""  # not waiting on the server: our own side is busy
        if now - self.last_activity > timeout:
            return f"the server sent nothing for {timeout:g}s"
        body = max(self.expected_in, self.received_in)
        if now > self.deadline + body / rate:
            return (
                f"the request did not finish by its deadline (the server moved "
                f"{self.received_in} bytes; {body / rate:.1f}s were allowed for the body on "
                f"top of the base, at {rate / 1024:g} KiB/s)"
            )
        return ""

    def expire(self, why: str) -> None:
        """The server went silent or too slow: the waiting read or write raises TimeoutError."""
        self._timed_out = why
        self._wake()
        writer = self._write_waiter
        if writer is not None and not writer.done():
            writer.set_result(None)
        self.close()

    def _raise_if_timed_out(self) -> None:
        if self._timed_out:
            raise TimeoutError(self._timed_out)

    # ---- our side --------------------------------------------------------------------
    def usable(self, now: float) -> bool:
        return (
            not self._eof
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < IDLE_SECONDS
            and self._start == self._end  # nothing unasked-for arrived while idle
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def received_nothing(self) -> bool:
        return self._start == self._end

    async def _more(self) -> None:
        """Until more bytes arrive or the connection ends."""
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self._raise_if_timed_out()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self.last_activity = _now()
        try:
            await waiter
        finally:
            self._waiter = None
        self._raise_if_timed_out()

    async def write(self, data: bytes | memoryview) -> None:
        """Send data; _EarlyAnswer as soon as the server has begun answering (it will not
        take the rest), ConnectionResetError when it closed first."""
        if self._end > self._start:
            raise _EarlyAnswer
        if self._lost is not None or self.transport is None:
            raise ConnectionResetError("the server closed the connection")
        self.transport.write(data)
        while self._write_paused and self._lost is None:
            waiter = asyncio.get_running_loop().create_future()
            self._write_waiter = waiter
            self.last_activity = _now()
            try:
                await waiter
            finally:
                self._write_waiter = None
            self._raise_if_timed_out()
            if self._end > self._start:
                raise _EarlyAnswer
        if self._lost is not None:
            raise ConnectionResetError("the server closed the connection mid-request")

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Staged bytes up to and including separator; b"" if the connection ended first
        with nothing staged (the caller decides what that means)."""
        searched = self._start
        while True:
            found = self._buffer.find(separator, searched, self._end)
            if found >= 0:
                end = found + len(separator)
                line = bytes(self._view[self._start : end])
                self._start = end
                return line
            if self._end - self._start >= limit:
                raise ProtocolError(f"an answer line or head is longer than {limit} bytes")
            if self._end - self._start == len(self._buffer):
                self._grow()
            if self._eof:
                if self._start == self._end:
                    return b""
                raise ProtocolError("the server closed the connection mid-answer")
            searched = max(self._start, self._end - len(separator) + 1)
            offset = searched - self._start
            await self._more()
            searched = self._start + offset

    def _grow(self) -> None:
        """A head larger than the staging buffer (rare: S3 heads are small)."""
        unread = bytes(self._view[self._start : self._end])
        self._buffer = _staging(len(self._buffer) * 2)
        self._buffer[: len(unread)] = unread
        self._view = memoryview(self._buffer)
        self._start, self._end = 0, len(unread)

    async def read_into(self, dest: memoryview, fill: bool = False) -> int:
        """Up to len(dest) bytes into dest; 0 only when the connection ended. `fill`: bytes
        the server owes us: wait for all of them (or the end) rather than returning what the
        first segment brought: one wake-up per range instead of one per segment (user CPU of
        a 1 GiB loopback pull 0.68-0.84 s -> 0.47-0.79 s, 3 paired runs at load 14)."""
        staged = self._end - self._start
        if staged:
            count = min(staged, len(dest))
            dest[:count] = self._view[self._start : self._start + count]
            self._start += count
            if self._read_paused and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            return count
        if self._eof or not len(dest):
            return 0
        self._target = dest
        self._received = 0
        self._fill = fill
        try:
            while not self._eof and (self._received == 0 or (fill and self._target is not None)):
                await self._more()
        finally:
            count = self._received
            self._target = None
            self._fill = False
        return count

    async def read_exactly(self, count: int) -> bytes:
        if self._end - self._start >= count:
            data = bytes(self._view[self._start : self._start + count])
            self._start += count
            return data
        buffer = bytearray(count)
        view = memoryview(buffer)
        filled = 0
        while filled < count:
            got = await self.read_into(view[filled:])
            if not got:
                raise ProtocolError(
                    f"the server closed the connection {count - filled} bytes early"
                )
            filled += got
        return bytes(buffer)


class Response:
    """Status, headers (lower-case names) and the body, read with read(), read_into() or
    read_all(); `body` is the whole body already, when it was small enough to come with the
    head. release() hands the connection back to the pool when the body was read to its end,
    and closes it otherwise; call it once."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_done",
        "_keep_alive",
        "_pool",
        "_remaining",
        "_until_eof",
        "body",
        "headers",
        "reason",
        "retried",
        "status",
    )

    def __init__(
        self,
        pool: ConnectionPool,
        conn: _Connection,
        status: int,
        reason: str,
        headers: dict[str, str],
        keep_alive: bool,
        has_body: bool,
        head: _Head | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body: bytes | None = None
        self.retried = False  # set by the caller's retry loop: an earlier attempt was lost
        self._pool = pool
        self._conn: _Connection | None = conn
        self._remaining = 0
        self._chunked: _Head | None = None  # the head's parser, fed the chunked body
        self._until_eof = False
        self._keep_alive = keep_alive
        self._done = False
        if not has_body:
            self._done = True
            self.body = b""
        elif head is not None and head.chunked:
            self._chunked = head
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
            if self._remaining < 0:
                raise ProtocolError(f"bad Content-Length {self._remaining}")
        else:  # HTTP/1.0 style: the body ends when the server closes
            self._until_eof = True
            self._keep_alive = False

    async def _prefetch(self) -> None:
        """Read a small Content-Length body now, so the connection is free at once."""
        fixed_length = not (self._done or self._chunked is not None or self._until_eof)
        if fixed_length and self._remaining <= PREFETCH_BODY:
            self.body = await self._live().read_exactly(self._remaining)
            self._remaining = 0
            self._done = True

    def _live(self) -> _Connection:
        if self._conn is None:
            raise ProtocolError("the response was already released")
        return self._conn

    async def read_into(self, dest: memoryview) -> int:
        """Up to len(dest) bytes of the body into dest; 0 at its end. Content-Length bodies
        land there straight from the socket."""
        if self.body is not None:
            data, self.body = self.body, b""
            if len(data) > len(dest):
                raise ValueError("read_into: the buffer is smaller than the read-ahead body")
            dest[: len(data)] = data
            return len(data)
        if self._done:
            return 0
        if self._chunked is not None or self._until_eof:
            data = await self.read(len(dest))
            dest[: len(data)] = data
            return len(data)
        count = await self._live().read_into(dest[: min(len(dest), self._remaining)], fill=True)
        if not count:
            raise ProtocolError(f"the server closed the connection {self._remaining} bytes early")
        self._remaining -= count
        self._done = self._remaining == 0
        return count

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (fewer if that is what arrived); b"" at its end."""
        if self.body is not None:
            data, self.body = self.body, b""
            return data
        if self._done:
            return b""
        if not (self._chunked is not None or self._until_eof):
            buffer = bytearray(min(limit, self._remaining))
            count = await self.read_into(memoryview(buffer))
            del buffer[count:]
            return bytes(buffer)
        conn = self._live()
        if self._chunked is not None:
            return await self._read_chunk(conn, self._chunked, limit)
        buffer = bytearray(limit)
        count = await conn.read_into(memoryview(buffer))
        self._done = not count
        return bytes(buffer[:count])

    async def _read_chunk(self, conn: _Connection, head: _Head, limit: int) -> bytes:
        """Body bytes of a chunked answer, de-chunked by the head's parser."""
        while not head.pieces:
            if head.complete:
                self._done = True
                if head.extra:  # bytes after the last chunk: nothing to reuse this for
                    self._keep_alive = False
                return b""
            buffer = bytearray(STAGING_BYTES)
            count = await conn.read_into(memoryview(buffer))
            if not count:
                raise ProtocolError("the server closed the connection inside a chunked body")
            head.feed(bytes(buffer[:count]))
        piece = head.pieces[0]
        if len(piece) <= limit:
            head.pieces.pop(0)
            return piece
        head.pieces[0] = piece[limit:]
        return piece[:limit]

    async def read_all(self) -> bytes:
        if self.body is not None:
            data, self.body = self.body, b""
            return data
        pieces = []
        while data := await self.read(STAGING_BYTES):
            pieces.append(data)
        return b"".join(pieces)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._pool._put_back(conn)
        else:
            self._pool._drop(conn)


class ConnectionPool:
    """Kept-alive connections to one host. Callers bound the concurrency (the S3 wrapper's
    semaphore); the pool keeps at most `max_idle` connections around between requests.

    Read timeouts and deadlines: one watchdog tick (every read_timeout/4, at most 1 s, only
    while requests are in flight) expires connections that waited that long with no byte
    either way, or whose request is past its deadline (module docstring). A timer per
    request and per read (asyncio.timeout) cost ~9% of a small-file sync's CPU.
    """

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        proxy: Proxy | None = None,
        deadline_base: float | None = None,
        deadline_rate: float = DEADLINE_RATE,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {scheme!r} (http or https)")
        if scheme == "https" and ssl_context is None:
            raise ValueError("https needs an SSL context")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # A request's head may legitimately take a read timeout of server think time; the
        # base leaves room for that twice over.
        self.deadline_base = 2 * read_timeout if deadline_base is None else deadline_base
        self.deadline_rate = deadline_rate
        self.max_idle = max_idle
        self._ssl = ssl_context if scheme == "https" else None
        self.proxy = proxy
        # Plain http through a proxy: absolute-form targets, and the proxy's credentials on
        # every request. https goes through a CONNECT tunnel and needs neither.
        self._forwarded = proxy is not None and self._ssl is None
        self._target_prefix = f"http://{host}:{port}" if self._forwarded else ""
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        # The shortest time from a bodiless request sent to its answer's head: the link's
        # round trip plus the server's quickest answer (None until one was measured).
        self.round_trip: float | None = None
        self._warming: set[asyncio.Task[None]] = set()
        self._tick: asyncio.TimerHandle | None = None
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    early = await _take_early(self.host, self.port)
                    where = {"sock": early} if early else {"host": self.host, "port": self.port}
                    _transport, conn = await loop.create_connection(
                        _Connection,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                        **where,
                    )
                else:
                    _transport, conn = await loop.create_connection(
                        _Connection, proxy.host, proxy.port
                    )
                    if self._ssl is not None:
                        await self._tunnel(conn, proxy)
        except TimeoutError:
            via = f" through the proxy {proxy.name}" if proxy else ""
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}{via}: "
                f"no answer within {self.connect_timeout:g}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in _X509_NAME_MISMATCH:  # a trusted CA, another name
                why = (
                    f"the server's certificate is not for {self.host} (check AWS_ENDPOINT_URL; "
                    "with a bucket name in the host, --addressing-style path)"
                )
            else:
                why = (
                    "the server's certificate is not trusted (a private CA? point "
                    "AWS_CA_BUNDLE at its PEM file)"
                )
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: {exc.verify_message or exc}; {why}",
                permanent=True,
            ) from None
        except OSError as exc:
            if isinstance(exc, ConnectError):
                raise
            cause = exc.strerror or str(exc) or type(exc).__name__
            via = f" through the proxy {proxy.name}" if proxy else ""
            raise ConnectError(f"cannot connect to {self.host}:{self.port}{via}: {cause}") from None
        return conn

    async def _tunnel(self, conn: _Connection, proxy: Proxy) -> None:
        """CONNECT through the proxy, then TLS with the server over the tunnel."""
        authority = f"{self.host}:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        await conn.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
        if not head:
            raise ConnectError(f"the proxy {proxy.name} closed the connection on CONNECT")
        parsed = _Head(head)
        status, reason = parsed.status, parsed.reason
        if status != 200:
            conn.close()
            raise ConnectError(
                f"the proxy {proxy.name} refused the tunnel to {authority}: {status} {reason}",
                permanent=status in (403, 407),
            )
        assert conn.transport is not None and self._ssl is not None
        conn.transport = await asyncio.get_running_loop().start_tls(
            conn.transport, conn, self._ssl, server_hostname=self.host
        )

    def warm(self, target: int) -> int:
        """Open connections in the background until `target` exist (idle, busy or being
        opened; at most max_idle): requests that come later find them ready instead of
        paying a handshake's round trip each. Returns how many it started. A connection
        that cannot be made is simply not there (the request that needs one reports why)."""
        if self._closed:
            return 0
        target = min(target, self.max_idle)
        count = target - len(self._idle) - len(self._busy) - len(self._warming)
        for _ in range(max(0, count)):
            task = asyncio.get_running_loop().create_task(self._open_idle())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)
        return max(0, count)

    async def _open_idle(self) -> None:
        try:
            conn = await self._connect()
        except ConnectError:
            return
        conn.idle_since = time.monotonic()
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def _put_back(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _drop(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.close()

    def _watch(self) -> None:
        if self._tick is None and not self._closed:
            interval = min(1.0, self.read_timeout / 4)
            self._tick = asyncio.get_running_loop().call_later(interval, self._check, interval)

    def _check(self, interval: float) -> None:
        self._tick = None
        now = _now()
        for conn in list(self._busy):
            why = conn.why_stuck(now, self.read_timeout, self.deadline_rate)
            if why:
                conn.expire(why)
        if self._busy and not self._closed:
            self._tick = asyncio.get_running_loop().call_later(interval, self._check, interval)

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | memoryview | None = None,
        work_bytes: int = 0,
    ) -> Response:
        """Send one request (target: the encoded path and query) and read the answer's head.
        `work_bytes`: what the server moves on its own before it answers (a server-side
        copy), allowed for in the deadline as if it were sent.

        A kept-alive connection the server closed meanwhile is replaced once, transparently,
        when nothing of the answer had arrived on it, and either the request had not been
        sent whole (so it cannot have been applied) or it is replayable(). Otherwise the
        server may have applied it: AnswerLost, for the caller to retry knowingly.
        """
        if self._closed:
            raise ProtocolError("the connection pool is closed")
        lines = [f"{method} {self._target_prefix}{target} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if self._forwarded and self.proxy is not None and self.proxy.authorization:
            lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            self._busy.add(conn)
            sent = (len(body) if body is not None else 0) + work_bytes
            conn.begin(_now(), self.deadline_base + sent / self.deadline_rate)
            self._watch()
            try:
                return await self._exchange(conn, method, head, body)
            except _StaleConnection as stale:
                self._drop(conn)
                if not reused:
                    raise ProtocolError(
                        "the server closed the connection without an answer"
                    ) from None
                if stale.sent and not replayable(method, headers):
                    raise AnswerLost(
                        "the server closed a kept-alive connection after the whole request "
                        "was sent, without an answer (it may have been applied)"
                    ) from None
            except BaseException:
                self._drop(conn)
                raise

    async def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes | memoryview | None
    ) -> Response:
        early = await _send(conn, head, body)
        sent_at = _now() if body is None else 0.0
        parsed = await _answer_head(conn)
        if sent_at:
            self._saw_answer(_now() - sent_at)
        status, headers = parsed.status, parsed.headers
        has_body = method != "HEAD" and status not in (204, 304)
        response = Response(
            self,
            conn,
            status,
            parsed.reason,
            headers,
            _keeps_alive(parsed, early),
            has_body,
            parsed,
        )
        conn.expected_in = response._remaining  # the announced body (0: not announced)
        conn.received_in = 0  # the body counts from here; the head was in the base
        await response._prefetch()
        if response._done:
            response.release()  # the whole answer is in memory: free the connection now
        return response

    def _saw_answer(self, seconds: float) -> None:
        if self.round_trip is None or seconds < self.round_trip:
            self.round_trip = seconds

    async def close(self) -> None:
        self._closed = True
        for task in list(self._warming):
            task.cancel()
        if self._warming:
            await asyncio.gather(*self._warming, return_exceptions=True)
            self._warming.clear()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _send(conn: _Connection, head: bytes, body: bytes | memoryview | None) -> bool:
    """Writes the request; True if the server answered before taking all of it (early)."""
    try:
        if body is None or len(body) <= PREFETCH_BODY:
            await conn.write(head + bytes(body) if body else head)
        else:
            await conn.write(head)
            view = memoryview(body)
            for start in range(0, len(view), WRITE_SLICE):
                # asyncio copies what the socket does not take at once: slices bound
                # that copy (one 16 MiB write would cost 16 MiB more RSS).
                await conn.write(view[start : start + WRITE_SLICE])
    except _EarlyAnswer:
        return True
    except (ConnectionResetError, BrokenPipeError):
        # Closed before we handed over the whole request: never applied.
        if conn.received_nothing:
            raise _StaleConnection(sent=False) from None
        return True  # it answered first, then closed: read that answer
    return False


async def _answer_head(conn: _Connection) -> _Head:
    """The final answer's head, past any 1xx; a kept-alive connection the server had closed
    without a byte of answer is _StaleConnection(sent=True)."""
    try:
        raw = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
    except (ConnectionResetError, BrokenPipeError):
        if conn.received_nothing:
            raise _StaleConnection(sent=True) from None
        raise
    if not raw:
        raise _StaleConnection(sent=True)
    parsed = _Head(raw)
    while 100 <= parsed.status < 200:  # 1xx: the real answer follows
        parsed = _Head(await _read_head(conn))
    return parsed


def _keeps_alive(parsed: _Head, early: bool) -> bool:
    if early:  # the server still expects the rest of our body on this connection
        return False
    connection = parsed.headers.get("connection", "").lower()
    if parsed.version == "1.1":
        return connection != "close"
    return connection == "keep-alive"


async def _read_head(conn: _Connection) -> bytes:
    head = await conn.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
    if not head:
        raise ProtocolError("the server closed the connection inside the headers")
    return head


class _Head:
    """One answer's head, parsed by llhttp: status, reason, version, headers (lower-case
    names; repeated ones joined with ", "). For a chunked answer the same parser is then
    fed the body (feed()), and de-chunks it into `pieces`."""

    __slots__ = (
        "chunked",
        "complete",
        "extra",
        "headers",
        "parser",
        "pieces",
        "reason",
        "status",
        "version",
    )

    def __init__(self, raw: bytes) -> None:
        self.headers: dict[str, str] = {}
        self.reason = ""
        self.pieces: list[bytes] = []
        self.complete = False
        self.extra = False
        self.parser = httptools.HttpResponseParser(self)
        try:
            self.parser.feed_data(raw)
        except httptools.HttpParserError as exc:
            line = raw.split(b"\r\n", 1)[0].decode("utf-8", "replace")
            raise ProtocolError(f"a bad HTTP/1.x answer head ({exc}): {line[:60]!r}") from None
        self.version = self.parser.get_http_version()
        if self.version not in ("1.1", "1.0"):
            raise ProtocolError(f"a bad HTTP/1.x answer head: HTTP/{self.version}")
        self.status = self.parser.get_status_code()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if "content-length" in self.headers and not self.chunked:
            length = self.headers["content-length"]
            if not length.isdigit():  # llhttp checks digits; a joined repeat is "N, N"
                raise ProtocolError(f"bad Content-Length {length!r}")

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.complete:
                raise ProtocolError(f"bad chunked body: {exc}") from None
            self.extra = True  # garbage after the answer: the connection is not reused

    # llhttp's callbacks
    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.extra = True
        else:
            self.pieces.append(body)

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_message_complete(self) -> None:
        self.complete = True
