"""sidecar.s3.http11 against scripted loopback servers: framing, keep-alive, and every way a
server can break an exchange (each must surface as a retryable OSError, never as data)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.model import Direction
from sidecar.core.options import SyncConfig
from sidecar.engine.sync import SyncEngine
from sidecar.s3 import ClientSettings, ObjectStore, S3Error
from sidecar.s3.http11 import (
    PREFETCH_BODY,
    AnswerLost,
    ConnectError,
    ConnectionPool,
    ProtocolError,
    _Connection,
    connect_early,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)


async def read_request(reader: asyncio.StreamReader, server: Server) -> bytes | None:
    """One request (head + Content-Length body) off the wire; None when the client left."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    server.requests.append((head, body))
    return head


@asynccontextmanager
async def serving(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Server, int]]:
    """A loopback server running handler for each connection (over TLS with `tls`, a
    server context); yields it and its port."""
    server = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await handler(reader, writer, server)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await listener.wait_closed()


@asynccontextmanager
async def scripted(
    handler: Handler, **pool_options: Any
) -> AsyncIterator[tuple[Server, ConnectionPool]]:
    """serving(handler), and a pool to it (read timeout 0.5 s unless pool_options say)."""
    options: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 0.5, "max_idle": 4}
    options.update(pool_options)
    async with serving(handler) as (server, port):
        pool = ConnectionPool("http", "127.0.0.1", port, **options)
        try:
            yield server, pool
        finally:
            await pool.close()


def answer(status: int, body: bytes = b"", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def answering_once(raw: bytes) -> Handler:
    """A server that reads one request, sends `raw` as it is, and closes the connection."""

    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(raw)
        await writer.drain()

    return handler


def trickling(raw: bytes, at_once: int, interval: float) -> Handler:
    """A server that reads one request, sends raw[:at_once], then one more byte of raw every
    `interval` seconds: never silent for a read timeout, never done either."""

    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(raw[:at_once])
        for index in range(at_once, len(raw)):
            await writer.drain()
            await asyncio.sleep(interval)
            writer.write(raw[index : index + 1])
        await writer.drain()

    return handler


def answering_always(raw: bytes) -> Handler:
    """A server that sends `raw` as it is to every request on a kept-alive connection."""

    async def handler(reader, writer, server):
        while await read_request(reader, server) is not None:
            writer.write(raw)

    return handler


async def keep_answering(reader, writer, server, body: bytes = b"hello") -> None:
    while await read_request(reader, server) is not None:
        writer.write(answer(200, body, 'ETag: "abc"\r\nX-Amz-Meta-Mode: 420\r\n'))
        await writer.drain()


async def get_each_time(handler: Handler, times: int, body: bytes, pause: float = 0) -> Server:
    """GET / `times` times through one pool to `handler`, each answered `body` (read whole
    and released, then `pause` seconds); the server's counts say what was kept alive."""
    async with scripted(handler) as (server, pool):
        for _ in range(times):
            response = await pool.request("GET", "/", {"Host": "h"})
            assert await response.read_all() == body
            response.release()
            await asyncio.sleep(pause)
    return server


async def test_keep_alive_reuses_one_connection_and_reads_headers_lowercase() -> None:
    async with scripted(keep_answering) as (server, pool):
        for _ in range(5):
            response = await pool.request("GET", "/b/k", {"Host": "h"})
            assert response.status == 200
            assert response.headers["etag"] == '"abc"'
            assert response.headers["x-amz-meta-mode"] == "420"
            assert await response.read_all() == b"hello"
            response.release()
        assert server.connections == 1
        assert len(server.requests) == 5
        assert server.requests[0][0].startswith(b"GET /b/k HTTP/1.1\r\nHost: h\r\n")


async def _connections(server: Server, count: int) -> None:
    for _ in range(500):
        if server.connections >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.connections} connections, {count} expected")


async def test_connections_opened_early_carry_the_first_requests() -> None:
    # A one-shot sync opens two before its imports (store.connect_ahead): its first two
    # requests pay no handshake then.
    async with serving(keep_answering) as (server, port):
        connect_early("127.0.0.1", port, 2.0, count=2)
        await _connections(server, 2)
        pool = ConnectionPool(
            "http", "127.0.0.1", port, connect_timeout=2, read_timeout=5, max_idle=4
        )
        try:
            responses = await asyncio.gather(
                *(pool.request("GET", f"/b/k{n}", {"Host": "h"}) for n in range(2))
            )
            assert [r.body for r in responses] == [b"hello", b"hello"]
            assert server.connections == 2 and len(server.requests) == 2
        finally:
            await pool.close()


async def test_an_early_connection_the_server_closed_meanwhile_is_not_used() -> None:
    async def closes_the_first(reader, writer, server):
        if server.connections > 1:
            await keep_answering(reader, writer, server)

    async with serving(closes_the_first) as (server, port):
        connect_early("127.0.0.1", port, 2.0)
        await _connections(server, 1)
        await asyncio.sleep(0.05)  # the close has reached us
        pool = ConnectionPool(
            "http", "127.0.0.1", port, connect_timeout=2, read_timeout=5, max_idle=4
        )
        try:
            response = await pool.request("GET", "/b/k", {"Host": "h"})
            assert response.status == 200 and response.body == b"hello"
            assert server.connections == 2
        finally:
            await pool.close()


async def test_put_body_arrives_whole_small_and_sliced_large() -> None:
    async with scripted(keep_answering) as (server, pool):
        small = os.urandom(1000)
        large = os.urandom(5 * 1024 * 1024 + 7)
        for body in (b"", small, memoryview(large)):
            response = await pool.request("PUT", "/b/k", {"Host": "h"}, body)
            response.release()
        assert [len(b) for _, b in server.requests] == [0, 1000, len(large)]
        assert server.requests[1][1] == small and server.requests[2][1] == large
        assert b"Content-Length: 0\r\n" in server.requests[0][0]


async def test_head_has_no_body_and_keeps_the_connection() -> None:
    handler = answering_always(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n")

    async with scripted(handler) as (server, pool):
        for _ in range(3):
            response = await pool.request("HEAD", "/b/k", {"Host": "h"})
            assert response.headers["content-length"] == "999"
            assert await response.read_all() == b""
            response.release()
        assert server.connections == 1


async def test_large_body_streams_in_pieces() -> None:
    payload = os.urandom(3 * 1024 * 1024)

    async with scripted(lambda r, w, s: keep_answering(r, w, s, payload)) as (server, pool):
        response = await pool.request("GET", "/b/k", {"Host": "h"})
        pieces = []
        while data := await response.read(256 * 1024):
            assert len(data) <= 256 * 1024
            pieces.append(data)
        response.release()
        assert b"".join(pieces) == payload
        response = await pool.request("GET", "/b/k", {"Host": "h"})  # connection reused
        assert await response.read_all() == payload
        response.release()
        assert server.connections == 1


async def test_chunked_body_with_extensions_and_trailers() -> None:
    handler = answering_always(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    server = await get_each_time(handler, 2, b"hello world")
    assert server.connections == 1


async def test_body_until_close_for_http10_answers() -> None:
    handler = answering_once(b"HTTP/1.0 200 OK\r\n\r\nall of it")

    server = await get_each_time(handler, 2, b"all of it")
    assert server.connections == 2  # not kept alive


async def test_connection_close_is_honoured() -> None:
    handler = answering_once(answer(200, b"x", "Connection: close\r\n"))

    server = await get_each_time(handler, 2, b"x")
    assert server.connections == 2


async def test_a_kept_alive_connection_closed_by_the_server_is_replaced() -> None:
    # One answer per connection, then the server closes it, as idle timeouts do.
    handler = answering_once(answer(200, b"once"))

    server = await get_each_time(handler, 3, b"once", pause=0.05)
    assert server.connections == 3


async def test_stale_connection_found_only_by_the_request_is_replaced_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's close lands after the pool's check (a race the check cannot win)."""

    handler = answering_once(answer(200, b"once"))
    monkeypatch.setattr(_Connection, "usable", lambda self, now: True)
    server = await get_each_time(handler, 3, b"once", pause=0.05)
    assert server.connections == 3
    assert len(server.requests) == 3


def answering_then_dropping(raw: bytes) -> Handler:
    """A server that answers the first request on a connection, reads the second whole,
    and closes without a byte of answer (applied, then reset; or an idle close that raced)."""

    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(raw)
        await writer.drain()
        await read_request(reader, server)

    return handler


@pytest.mark.parametrize(
    ("method", "headers", "blind"),
    [
        ("GET", {}, True),
        ("HEAD", {}, True),
        ("PUT", {}, True),
        ("DELETE", {}, True),
        ("PUT", {"If-None-Match": "*"}, False),
        ("PUT", {"if-match": '"abc"'}, False),
        ("DELETE", {"If-Match": '"abc"'}, False),
        ("POST", {}, False),
    ],
)
async def test_a_request_lost_after_it_was_sent_is_resent_blind_only_when_replayable(
    method: str, headers: dict[str, str], blind: bool
) -> None:
    """Issue 9 item 14: a kept-alive connection closed after the whole request went out may
    have had it applied. A conditional PUT resent silently would meet its own write (412)
    and be told the object changed; such a loss must reach the caller, who checks."""
    handler = answering_then_dropping(answer(200, b"first"))
    async with scripted(handler) as (server, pool):
        first = await pool.request("GET", "/", {"Host": "h"})
        assert await first.read_all() == b"first"
        first.release()
        if blind:
            again = await pool.request(method, "/k", {"Host": "h", **headers}, b"body")
            assert again.status == 200
            again.release()
            assert server.connections == 2 and len(server.requests) == 3
        else:
            with pytest.raises(AnswerLost, match="may have been applied"):
                await pool.request(method, "/k", {"Host": "h", **headers}, b"body")
            assert server.connections == 1 and len(server.requests) == 2


async def test_closing_mid_body_is_a_protocol_error_naming_the_shortfall() -> None:
    handler = answering_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)

    async with scripted(handler) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        with pytest.raises(ProtocolError, match="700000 bytes early"):
            await response.read_all()
        response.release()


async def test_closing_a_small_body_short_fails_the_request() -> None:
    handler = answering_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")

    async with scripted(handler) as (_server, pool):
        with pytest.raises(ProtocolError, match="95 bytes early"):
            await pool.request("GET", "/", {"Host": "h"})


async def test_closing_inside_a_chunk_is_a_protocol_error() -> None:
    handler = answering_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")

    async with scripted(handler) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        with pytest.raises(ProtocolError, match="inside a chunk"):
            await response.read_all()
        response.release()


async def test_a_silent_server_times_out() -> None:
    async def handler(reader, writer, server):
        await read_request(reader, server)
        await asyncio.sleep(5)

    async with scripted(handler) as (_server, pool):
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/", {"Host": "h"})


async def test_a_body_that_stalls_times_out() -> None:
    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)
        await asyncio.sleep(5)

    async with scripted(handler) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        with pytest.raises(TimeoutError):
            await response.read_all()
        response.release()


async def test_an_answer_that_is_not_http_is_a_protocol_error() -> None:
    handler = answering_once(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with scripted(handler) as (_server, pool):
        with pytest.raises(ProtocolError, match=r"bad HTTP/1\.x answer head .*SSH"):
            await pool.request("GET", "/", {"Host": "h"})


async def test_a_fresh_connection_closed_without_answer_is_a_protocol_error() -> None:
    async def handler(reader, writer, server):
        await read_request(reader, server)

    async with scripted(handler) as (_server, pool):
        with pytest.raises(ProtocolError, match="without an answer"):
            await pool.request("GET", "/", {"Host": "h"})


async def test_informational_answers_are_skipped() -> None:
    handler = answering_once(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(201, b"made"))

    async with scripted(handler) as (_server, pool):
        response = await pool.request("PUT", "/", {"Host": "h"}, b"x")
        assert response.status == 201
        assert await response.read_all() == b"made"
        response.release()


async def test_releasing_an_unread_body_closes_the_connection() -> None:
    big = b"y" * (1024 * 1024)

    async with scripted(lambda r, w, s: keep_answering(r, w, s, big)) as (server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        await response.read(1000)
        response.release()
        response = await pool.request("GET", "/", {"Host": "h"})
        assert await response.read_all() == big
        response.release()
        assert server.connections == 2


async def test_refused_connection_is_a_connect_error_naming_the_address() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    pool = ConnectionPool("http", "127.0.0.1", port, connect_timeout=2, read_timeout=1, max_idle=1)
    with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
        await pool.request("GET", "/", {"Host": "h"})


async def test_bad_content_length_is_a_protocol_error() -> None:
    handler = answering_once(b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n")

    async with scripted(handler) as (_server, pool):
        with pytest.raises(ProtocolError, match="Content-Length"):
            await pool.request("GET", "/", {"Host": "h"})


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        ConnectionPool("ftp", "h", 21, connect_timeout=1, read_timeout=1, max_idle=1)


async def test_read_into_takes_a_large_body_straight_into_the_callers_buffer() -> None:
    payload = os.urandom(5 * 1024 * 1024 + 3)

    async with scripted(lambda r, w, s: keep_answering(r, w, s, payload)) as (server, pool):
        for _ in range(2):
            response = await pool.request("GET", "/b/k", {"Host": "h"})
            assert response.body is None  # too big to come with the head
            buffer = bytearray(100_000)
            view = memoryview(buffer)
            received = bytearray()
            while count := await response.read_into(view):
                received += view[:count]
            response.release()
            assert received == payload
        assert server.connections == 1


async def test_a_body_nobody_reads_for_a_while_pauses_the_socket_and_arrives_whole() -> None:
    payload = os.urandom(4 * 1024 * 1024)

    async with scripted(lambda r, w, s: keep_answering(r, w, s, payload)) as (_server, pool):
        response = await pool.request("GET", "/b/k", {"Host": "h"})
        await asyncio.sleep(0.2)  # the staging buffer fills; reading must pause, not grow
        conn = response._conn
        assert conn is not None and len(conn._buffer) == 256 * 1024
        assert await response.read_all() == payload
        response.release()


async def test_heads_larger_than_the_staging_buffer_are_read() -> None:
    filler = "".join(f"X-Amz-Meta-F{i}: {'v' * 200}\r\n" for i in range(2000))  # ~420 KiB

    handler = answering_once(answer(200, b"ok", filler))

    async with scripted(handler) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        assert response.headers["x-amz-meta-f1999"] == "v" * 200
        assert await response.read_all() == b"ok"
        response.release()


async def test_an_endless_head_is_refused() -> None:
    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(40):
            writer.write(b"X-Pad: " + b"p" * 65536 + b"\r\n")
            await writer.drain()

    async with scripted(handler) as (_server, pool):
        with pytest.raises(ProtocolError, match="longer than"):
            await pool.request("GET", "/", {"Host": "h"})


async def test_a_slow_but_steady_body_does_not_time_out() -> None:
    """The read timeout is for silence, not for the whole answer (0.5 s here; 2 s in all)."""

    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            await asyncio.sleep(0.2)
            writer.write(b"x")
            await writer.drain()

    async with scripted(handler, deadline_base=30) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        assert await response.read_all() == b"x" * 10
        response.release()


async def test_an_upload_the_server_stops_reading_times_out() -> None:
    async def handler(reader, writer, server):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)  # never reads the body

    async with scripted(handler) as (_server, pool):
        with pytest.raises(TimeoutError):
            await pool.request("PUT", "/", {"Host": "h"}, os.urandom(64 * 1024 * 1024))


async def test_the_watchdog_runs_only_while_requests_are_in_flight() -> None:
    async with scripted(keep_answering) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        response.release()
        assert pool._tick is not None  # ends at its next tick: nothing is in flight
        await asyncio.sleep(0.2)
        assert pool._tick is None and not pool._busy


# ---- deadlines: a server that trickles is cut off as surely as a silent one ----------
TRICKLE = 0.5  # s between bytes: well inside the 2 s read timeout of these pools


@pytest.mark.parametrize("size", [1000, 300 * 1024])  # read with the head; streamed
async def test_a_trickling_body_fails_by_its_deadline(size: int) -> None:
    raw = answer(200, b"x" * size)
    head = raw.index(b"\r\n\r\n") + 4
    options = {"read_timeout": 2, "deadline_base": 1, "deadline_rate": 1024 * 1024}
    async with scripted(trickling(raw, head, TRICKLE), **options) as (_server, pool):
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError, match="deadline"):
            response = await pool.request("GET", "/b/k", {"Host": "h"})
            try:
                await response.read_all()
            finally:
                response.release()
        # ~1.3 s at most (base + the body at 1 MiB/s); the trickle alone would take hours.
        assert asyncio.get_running_loop().time() - started < 30
        assert not pool._busy


async def test_a_trickling_head_fails_by_its_deadline() -> None:
    raw = answer(200, b"hello", 'ETag: "abc"\r\nX-Amz-Meta-Mode: 420\r\n')
    async with scripted(trickling(raw, 5, TRICKLE), read_timeout=2, deadline_base=1) as (
        _server,
        pool,
    ):
        with pytest.raises(TimeoutError, match="deadline"):
            await pool.request("GET", "/b/k", {"Host": "h"})


async def test_a_large_body_on_a_slow_healthy_link_gets_time_for_its_size() -> None:
    """2 MiB at ~1.3 MiB/s takes ~1.6 s: past the 0.5 s base, well within base + 2 MiB at the
    256 KiB/s floor (8.5 s)."""
    payload = os.urandom(2 * 1024 * 1024)

    async def handler(reader, writer, server):
        await read_request(reader, server)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
        for start in range(0, len(payload), 128 * 1024):
            await asyncio.sleep(0.1)
            writer.write(payload[start : start + 128 * 1024])
            await writer.drain()

    options = {"read_timeout": 2, "deadline_base": 0.5, "deadline_rate": 256 * 1024}
    async with scripted(handler, **options) as (_server, pool):
        started = asyncio.get_running_loop().time()
        response = await pool.request("GET", "/b/k", {"Host": "h"})
        assert await response.read_all() == payload
        response.release()
        assert asyncio.get_running_loop().time() - started > 0.5  # the base alone was not enough


# ---- the same through the S3 client and a whole pull ----------------------------------
BUCKET = "bkt"
OBJECTS = {"vol/ok.txt": b"fine\n", "vol/slow.bin": b"s" * 2000}


def fake_s3(trickle_listing: bool = False, trickle_keys: frozenset[str] = frozenset()) -> Handler:
    """Just enough S3 for a pull of OBJECTS; the listing or some GETs trickle their body."""

    def listing() -> bytes:
        entries = "".join(
            f"<Contents><Key>{key}</Key><Size>{len(body)}</Size>"
            f'<ETag>"{hashlib.md5(body).hexdigest()}"</ETag>'
            "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
            for key, body in OBJECTS.items()
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name>'
            f"<KeyCount>{len(OBJECTS)}</KeyCount><IsTruncated>false</IsTruncated>{entries}"
            "</ListBucketResult>"
        ).encode()

    async def handler(reader, writer, server):
        while (head := await read_request(reader, server)) is not None:
            target = head.split(b" ", 2)[1].decode()
            key = target.split("?")[0].removeprefix(f"/{BUCKET}/")
            if "list-type=2" in target:
                raw, slow = answer(200, listing()), trickle_listing
            elif key in OBJECTS:
                etag = hashlib.md5(OBJECTS[key]).hexdigest()
                raw, slow = answer(200, OBJECTS[key], f'ETag: "{etag}"\r\n'), key in trickle_keys
            else:
                raw, slow = answer(404, b"<Error><Code>NoSuchKey</Code></Error>"), False
            if not slow:
                writer.write(raw)
                await writer.drain()
                continue
            writer.write(raw[: raw.index(b"\r\n\r\n") + 4])
            for index in range(raw.index(b"\r\n\r\n") + 4, len(raw)):
                await writer.drain()
                await asyncio.sleep(TRICKLE)
                writer.write(raw[index : index + 1])

    return handler


FAST_DEADLINES = ClientSettings(
    concurrency=2, read_timeout=2, max_attempts=2, deadline_base=1, deadline_rate=1024 * 1024
)


@pytest.fixture
def endpoint_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    def point_at(port: int) -> None:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "fake-key-0123456789",
            "AWS_SECRET_ACCESS_KEY": "fake-secret-0123456789",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)

    return point_at


async def test_trickled_listing_get_and_delete_fail_by_name_and_are_retried(
    endpoint_env: Callable[[int], None],
) -> None:
    async with serving(fake_s3(trickle_listing=True, trickle_keys=frozenset(OBJECTS))) as (
        server,
        port,
    ):
        endpoint_env(port)
        started = asyncio.get_running_loop().time()
        async with ObjectStore(BUCKET, FAST_DEADLINES) as store:
            with pytest.raises(S3Error, match="deadline") as listed:
                async for _page in store.list("vol/"):
                    pass
            assert listed.value.key == BUCKET and listed.value.code == "Timeout"
            with pytest.raises(S3Error, match="deadline") as got:
                await store.get_object("vol/slow.bin", None, lambda data: None)
            assert got.value.key == "vol/slow.bin" and got.value.retryable
        assert server.connections == 4, "each was not tried twice (max_attempts)"
        assert asyncio.get_running_loop().time() - started < 60

    # The rare operations (delete, copy, multipart) go the same way: the deadline applies.
    raw = answer(204, b"", "x-amz-request-id: 1\r\n")
    async with serving(trickling(raw, 12, TRICKLE)) as (server, port):
        endpoint_env(port)
        async with ObjectStore(BUCKET, FAST_DEADLINES) as store:
            with pytest.raises(S3Error) as deleted:
                await store.delete("vol/ok.txt")
        assert deleted.value.key == "vol/ok.txt" and deleted.value.code == "Timeout"


@pytest.mark.parametrize("trickled", ["listing", "get"])
async def test_a_pull_from_a_trickling_server_fails_by_name_in_bounded_time(
    trickled: str, endpoint_env: Callable[[int], None], workdir: Path
) -> None:
    handler = (
        fake_s3(trickle_listing=True)
        if trickled == "listing"
        else fake_s3(trickle_keys=frozenset({"vol/slow.bin"}))
    )
    local = workdir / "local"
    config = SyncConfig(
        bucket=BUCKET, prefix="vol/", local_dir=local, state_dir=workdir / "state", concurrency=2
    )
    async with serving(handler) as (_server, port):
        endpoint_env(port)
        async with SyncEngine(config, FAST_DEADLINES) as engine:
            # Bounded: the deadline ends it (named below); wait_for only turns a hang into a
            # failure, never a slow machine's run.
            result = await asyncio.wait_for(engine.run(Direction.PULL), 120)
    assert not result.ok
    if trickled == "listing":
        assert result.fatal and "listing" in result.fatal and "deadline" in result.fatal
    else:
        assert [e.path for e in result.errors] == ["slow.bin"], result.as_dict()
        assert "deadline" in result.errors[0].reason
        assert (local / "ok.txt").read_bytes() == OBJECTS["vol/ok.txt"]
        assert result.retries >= 1


def early_answering(raw: bytes, close: bool) -> Handler:
    """A server that reads only the head of a request, answers `raw` at once, and then
    closes (close) or sits there without reading the body."""

    async def handler(reader, writer, server):
        head = await reader.readuntil(b"\r\n\r\n")
        server.requests.append((head, b""))
        writer.write(raw)
        await writer.drain()
        if close:
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(30)

    return handler


@pytest.mark.parametrize("close", [True, False], ids=["then-closes", "stops-reading"])
async def test_an_early_answer_to_an_upload_is_returned_not_lost_nor_resent(close: bool) -> None:
    """Issue 10: a server that refuses an upload before taking its body (an early 412) and
    closes, or stops reading: the answer is the result, the body is not re-sent, and the
    connection (which still owes the server the body) is not reused."""
    handler = early_answering(answer(412, b"<Error><Code>PreconditionFailed</Code></Error>"), close)
    async with scripted(handler, read_timeout=5) as (server, pool):
        response = await pool.request("PUT", "/k", {"Host": "h"}, os.urandom(16 * 1024 * 1024))
        assert response.status == 412
        assert b"PreconditionFailed" in await response.read_all()
        response.release()
        assert server.connections == 1 and len(server.requests) == 1
        assert not pool._idle  # never reused


def chunked(*lines: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(lines)


@pytest.mark.parametrize("size", [b"0x10", b"1_0", b"-5", b"+5", b"g"])
async def test_a_bad_chunk_size_is_a_protocol_error(size: bytes) -> None:
    handler = answering_once(chunked(size + b"\r\n", b"x" * 16 + b"\r\n0\r\n\r\n"))
    async with scripted(handler) as (_server, pool):
        response = await pool.request("GET", "/", {"Host": "h"})
        with pytest.raises(ProtocolError, match="chunk"):
            await response.read_all()
        response.release()


async def test_length_and_chunked_together_are_refused() -> None:
    """Both framings in one answer is how responses get smuggled: never guess."""
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    async with scripted(answering_once(raw)) as (_server, pool):
        with pytest.raises(ProtocolError):
            response = await pool.request("GET", "/", {"Host": "h"})
            await response.read_all()


async def test_a_chunked_answer_in_odd_pieces_reads_whole_and_keeps_the_connection() -> None:
    body = os.urandom(300_000)
    raw = chunked(
        b"1\r\n",
        body[:1],
        b"\r\n",
        f"{len(body) - 1:x};ext=1\r\n".encode(),
        body[1:],
        b"\r\n",
        b"0\r\nX-Trailer: t\r\n\r\n",
    )

    async def handler(reader, writer, server):
        while await read_request(reader, server) is not None:
            for start in range(0, len(raw), 7777):  # boundaries anywhere, CRLFs split too
                writer.write(raw[start : start + 7777])
                await writer.drain()

    server = await get_each_time(handler, 2, body)
    assert server.connections == 1


# ---- keep-alive after errors: what the next request gets -------------------------------
LATE = answer(200, b"late answer to the first request")


def failing_first(kind: str) -> Handler:
    """A server whose first request fails as `kind` says; every later request, on any
    connection, is answered 200 "next"."""

    async def handler(reader, writer, server):
        while await read_request(reader, server) is not None:
            if len(server.requests) > 1:
                writer.write(answer(200, b"next"))
            elif kind == "error-read":  # an error answer, read whole: reusable
                writer.write(answer(412, b"<Error><Code>PreconditionFailed</Code></Error>"))
            elif kind == "error-unread":  # an error answer with a large body left unread
                writer.write(answer(500, b"x" * 1_000_000))
            elif kind == "truncated":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10)
                await writer.drain()
                return
            elif kind == "chunked-truncated":
                writer.write(chunked(b"5\r\nhello\r\n", b"5\r\nwor"))
                await writer.drain()
                return
            elif kind == "silent":  # answers only after the client gave up
                await asyncio.sleep(1.0)
                writer.write(LATE)
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("kind", "connections"),
    [
        ("error-read", 1),
        ("error-unread", 2),
        ("truncated", 2),
        ("chunked-truncated", 2),
        ("silent", 2),
    ],
)
async def test_after_a_failed_exchange_the_next_request_gets_its_own_answer(
    kind: str, connections: int
) -> None:
    """Issue 10 item 6: a connection is reused after an error answer only when that answer
    was read to its end; after a cut body or a timeout it is closed, so the next request
    never reads the rest of the last one (or its late answer) as its own."""
    async with scripted(failing_first(kind), read_timeout=0.3) as (server, pool):
        try:
            first = await pool.request("GET", "/first", {"Host": "h"})
            if kind == "error-read":
                assert first.status == 412 and b"Precondition" in await first.read_all()
            elif kind == "error-unread":
                assert first.status == 500  # released with its body unread
            else:
                await first.read_all()
                raise AssertionError(f"{kind}: the body was taken for whole")
            first.release()
        except (ProtocolError, TimeoutError) as exc:
            assert kind in ("truncated", "chunked-truncated", "silent"), exc
        for _ in range(2):
            response = await pool.request("GET", "/next", {"Host": "h"})
            assert (response.status, await response.read_all()) == (200, b"next")
            response.release()
        assert server.connections == connections


async def test_a_fixed_length_body_fills_the_buffer_in_one_read_however_it_arrives() -> None:
    """read_into waits for every byte the buffer can take of a Content-Length body, not just
    the first segment: one wake-up per range, not one per segment."""
    body = os.urandom(PREFETCH_BODY + 256 * 1024)  # larger than what is read with the head

    async def in_segments(reader, writer, server):  # type: ignore[no-untyped-def]
        await read_request(reader, server)
        writer.write(answer(200, body)[: -len(body)])  # the head alone
        for start in range(0, len(body), 64 * 1024):
            await writer.drain()
            await asyncio.sleep(0.01)  # each 64 KiB arrives as a segment of its own
            writer.write(body[start : start + 64 * 1024])
        await writer.drain()

    async with scripted(in_segments, read_timeout=5) as (_server, pool):
        response = await pool.request("GET", "/b/k", {"Host": "h"})
        buffer = memoryview(bytearray(len(body)))
        got = 0
        while not got:  # what came with the head (nothing, or a first segment) on its own
            got = await response.read_into(buffer)
        assert await response.read_into(buffer[got:]) == len(body) - got
        assert bytes(buffer) == body
        response.release()
