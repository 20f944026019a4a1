"""A lean HTTP/1.1 keep-alive client for the S3 hot path (list, HEAD, GET, PUT, UploadPart).

Why not aiohttp's client: profiled over 1,000 small GETs against `rclone serve s3`, its
ClientSession spent ~260 us of CPU per request (timers, URL objects, multidicts, trace and
cookie hooks), more than all the rest of the work a small-file sync does per file, and importing
it costs a one-shot sync ~120 ms (it builds two SSL contexts at import). S3 answers are plain
HTTP/1.1 (a status line, headers, a Content-Length or chunked body), which asyncio streams
read well; this module is only that, plus a pool of kept-alive connections.

Errors: every failure is an OSError a caller can retry (ConnectError when no connection could
be made, ProtocolError when the server broke an exchange, TimeoutError when it went silent for
the read timeout), never a half-read response handed back as if complete.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping

BUFFER_LIMIT = 1 << 20  # per connection: the socket is paused beyond twice this
PREFETCH_BODY = 256 * 1024  # bodies up to this size are read with the head, in one go
WRITE_SLICE = 1 << 20  # big request bodies are written in slices with drains between
IDLE_SECONDS = 15.0  # kept-alive connections older than this are closed, not reused


class ConnectError(ConnectionError):
    """No connection could be made (refused, unresolvable, TLS failure, connect timeout)."""


class ProtocolError(ConnectionError):
    """The server broke the exchange: closed early or answered with something not HTTP/1.1."""


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.transport.is_closing()
            and now - self.idle_since < IDLE_SECONDS
        )

    def close(self) -> None:
        self.writer.transport.abort()


class Response:
    """Status, headers (lower-case names) and the body, read with read()/read_all().

    release() hands the connection back to the pool when the body was read to its end, and
    closes it otherwise; call it exactly once.
    """

    __slots__ = (
        "_body",
        "_chunk_left",
        "_chunked",
        "_conn",
        "_done",
        "_keep_alive",
        "_pool",
        "_remaining",
        "_until_eof",
        "headers",
        "reason",
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
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._body: bytes | None = None
        self._remaining = 0
        self._chunked = False
        self._chunk_left = 0
        self._until_eof = False
        self._keep_alive = keep_alive
        self._done = False
        if not has_body:
            self._done = True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
            if self._remaining < 0:
                raise ProtocolError(f"bad Content-Length {self._remaining}")
            self._done = self._remaining == 0
        else:  # HTTP/1.0 style: the body ends when the server closes
            self._until_eof = True
            self._keep_alive = False

    async def _prefetch(self) -> None:
        """Read a small Content-Length body now, so the connection is free at once."""
        fixed_length = not (self._done or self._chunked or self._until_eof)
        if fixed_length and self._remaining <= PREFETCH_BODY:
            self._body = await _read_exactly(self._live().reader, self._remaining)
            self._remaining = 0
            self._done = True

    def _live(self) -> _Connection:
        if self._conn is None:
            raise ProtocolError("the response was already released")
        return self._conn

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (fewer if that is what arrived); b"" at its end."""
        if self._body is not None:
            data, self._body = self._body, None
            return data
        if self._done:
            return b""
        conn = self._live()
        async with asyncio.timeout(self._pool.read_timeout):
            if self._chunked:
                return await self._read_chunk(conn.reader, limit)
            if self._until_eof:
                data = await conn.reader.read(limit)
                self._done = not data
                return data
            data = await conn.reader.read(min(limit, self._remaining))
        if not data:
            raise ProtocolError(f"the server closed the connection {self._remaining} bytes early")
        self._remaining -= len(data)
        self._done = self._remaining == 0
        return data

    async def _read_chunk(self, reader: asyncio.StreamReader, limit: int) -> bytes:
        if self._chunk_left == 0:
            line = await _read_line(reader)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while await _read_line(reader) != b"\r\n":  # trailers, then the blank line
                    pass
                self._done = True
                return b""
            self._chunk_left = size
        data = await reader.read(min(limit, self._chunk_left))
        if not data:
            raise ProtocolError("the server closed the connection inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and await _read_exactly(reader, 2) != b"\r\n":
            raise ProtocolError("a chunk did not end with CRLF")
        return data

    async def read_all(self) -> bytes:
        if self._body is not None and self._done:
            data, self._body = self._body, None
            return data
        pieces = []
        while data := await self.read(BUFFER_LIMIT):
            pieces.append(data)
        return b"".join(pieces)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._pool._put_back(conn)
        else:
            conn.close()


class ConnectionPool:
    """Kept-alive connections to one host. Callers bound the concurrency (the S3 wrapper's
    semaphore); the pool keeps at most `max_idle` connections around between requests."""

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
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {scheme!r} (http or https)")
        if scheme == "https" and ssl_context is None:
            raise ValueError("https needs an SSL context")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._ssl = ssl_context if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    limit=BUFFER_LIMIT,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: "
                f"no answer within {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            cause = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {cause}") from None
        return _Connection(reader, writer)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def _put_back(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | memoryview | None = None,
    ) -> Response:
        """Send one request (target: the encoded path and query) and read the answer's head.

        A kept-alive connection the server closed meanwhile is replaced once, transparently,
        when nothing of the answer had arrived on it.
        """
        if self._closed:
            raise ProtocolError("the connection pool is closed")
        lines = [f"{method} {target} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, method, head, body)
            except _StaleConnection:
                conn.close()
                if not reused:
                    raise ProtocolError(
                        "the server closed the connection without an answer"
                    ) from None
            except BaseException:
                conn.close()
                raise

    async def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes | memoryview | None
    ) -> Response:
        writer = conn.writer
        async with asyncio.timeout(self.read_timeout) as deadline:
            try:
                if body is None or len(body) <= PREFETCH_BODY:
                    writer.write(head + bytes(body) if body else head)
                else:
                    writer.write(head)
                    view = memoryview(body)
                    for start in range(0, len(view), WRITE_SLICE):
                        # asyncio copies what the socket does not take at once: slices
                        # bound that copy (one 16 MiB write would cost 16 MiB more RSS).
                        writer.write(view[start : start + WRITE_SLICE])
                        await writer.drain()
                        deadline.reschedule(asyncio.get_running_loop().time() + self.read_timeout)
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _StaleConnection from None
                raise ProtocolError("the server closed the connection mid-answer") from None
            except (ConnectionResetError, BrokenPipeError):
                raise _StaleConnection from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("the answer's head is too long") from None
            status, reason, version, headers = _parse_head(head)
            while 100 <= status < 200:  # 1xx: the real answer follows
                status, reason, version, headers = _parse_head(await _read_head(conn.reader))
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.1":
                keep_alive = connection != "close"
            else:
                keep_alive = connection == "keep-alive"
            has_body = method != "HEAD" and status not in (204, 304)
            response = Response(self, conn, status, reason, headers, keep_alive, has_body)
            await response._prefetch()
        if response._done:
            response.release()  # the whole answer is in memory: free the connection now
        return response

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection turned out closed before any byte of the answer arrived."""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        raise ProtocolError("the server closed the connection mid-answer") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("an answer line is too long") from None


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Status line and headers, up to and including the blank line."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ProtocolError("the server closed the connection inside the headers") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("the answer's head is too long") from None


async def _read_exactly(reader: asyncio.StreamReader, count: int) -> bytes:
    try:
        return await reader.readexactly(count)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"the server closed the connection {count - len(exc.partial)} bytes early"
        ) from None


def _parse_head(head: bytes) -> tuple[int, str, str, dict[str, str]]:
    """(status, reason, version, headers with lower-case names) from an answer's head."""
    status_line, _, rest = head.decode("utf-8", "surrogateescape").partition("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"bad header line {line[:60]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], headers
