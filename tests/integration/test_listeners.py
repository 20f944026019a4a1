"""The listeners' guard: read deadline, connection cap and shedding, on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sidecar.daemon import web as sidecar_web
from sidecar.daemon.listeners import ConnectionGuard, GuardedSite, connection_cap
from sidecar.locals3 import free_port


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(1.0)  # longer than the read deadline: handlers are never cut
    return web.Response(text="done\n")


@contextlib.asynccontextmanager
async def serve(read_timeout: float) -> AsyncIterator[tuple[ConnectionGuard, int]]:
    guard = ConnectionGuard("test", limit=4, read_timeout=read_timeout)
    app = web.Application(middlewares=[guard.middleware, sidecar_web.strict_requests])
    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    app.router.add_post("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await GuardedSite(runner, "127.0.0.1", port, guard).start()
    try:
        yield guard, port
    finally:
        await runner.cleanup()


@pytest.fixture
async def served() -> AsyncIterator[tuple[ConnectionGuard, int]]:
    async with serve(read_timeout=0.3) as served:
        yield served


async def half_request(
    port: int, data: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def answer(port: int, request: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await reader.readline()
    finally:
        writer.close()


async def test_at_the_cap_a_new_connection_evicts_the_oldest_half_sent_one() -> None:
    async with serve(read_timeout=60) as (guard, port):
        held = [await half_request(port) for _ in range(6)]
        assert await answer(port) == b"HTTP/1.1 200 OK\r\n"
        assert guard.open_connections <= guard.limit
        assert guard.shed_total["evicted"] == 3
        async with asyncio.timeout(5):
            for reader, _ in held[:3]:
                assert await reader.read() == b""  # the oldest: closed by the server
        for _, writer in held:
            writer.close()


async def test_read_deadline_closes_connections_that_send_no_whole_request(
    served: tuple[ConnectionGuard, int],
) -> None:
    guard, port = served
    held = [await half_request(port), await half_request(port, b"")]
    async with asyncio.timeout(5):
        for reader, _ in held:
            assert await reader.read() == b""
    assert guard.shed_total["timeout"] == 2
    assert await answer(port) == b"HTTP/1.1 200 OK\r\n"
    for _, writer in held:
        writer.close()


async def test_a_running_handler_is_never_cut_by_the_read_deadline(
    served: tuple[ConnectionGuard, int],
) -> None:
    _, port = served
    assert await answer(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK\r\n"


async def test_shed_closes_idle_connections_and_keeps_running_handlers() -> None:
    async with serve(read_timeout=60) as (guard, port):
        busy = asyncio.ensure_future(answer(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
        idle = await half_request(port)
        async with asyncio.timeout(5):
            while guard.open_connections < 2 or guard.busy_connections < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert guard.shed() == 1
        assert guard.limit == 4  # SHUTDOWN_CONNECTIONS is 8: never raises the cap
        assert await idle[0].read() == b""
        assert await busy == b"HTTP/1.1 200 OK\r\n"
        idle[1].close()


async def test_a_body_that_does_not_arrive_in_time_is_cut_off(
    served: tuple[ConnectionGuard, int],
) -> None:
    guard, port = served
    reader, writer = await half_request(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a little"
    )
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    assert guard.shed_total["timeout"] == 1
    assert guard.busy_connections == 0
    writer.close()


def test_cap_leaves_the_sync_its_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (512, 512))
    assert connection_cap(concurrency=16) == (512 - 64 - 2 * 16) // 2 - 32
    monkeypatch.setattr(resource, "getrlimit", lambda _: (100, 100))
    assert connection_cap(concurrency=16) == 8
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert connection_cap(concurrency=16) == 256
