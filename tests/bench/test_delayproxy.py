"""The WAN delay proxy (delayproxy.py): bytes pass intact, and never sooner than the round trip,
the handshake, the window and the bandwidth allow. Lower bounds only: a loaded machine can
only make things slower, never faster (a few seconds in all)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from tests.bench.delayproxy import DelayProxy


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> float:
    """Seconds from sending payload to having all of it back."""
    started = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    received = await reader.readexactly(len(payload))
    assert received == payload
    return time.perf_counter() - started


async def test_a_new_connection_pays_the_handshake_then_every_exchange_one_rtt(
    echo_port: int,
) -> None:
    rtt = 0.15
    with DelayProxy("127.0.0.1", echo_port, rtt) as proxy:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        first = await exchange(reader, writer, b"ping")
        assert time.perf_counter() - started >= 2 * rtt  # SYN/SYN-ACK, then the request
        second = await exchange(reader, writer, b"pong" * 1000)
        assert first >= 2 * rtt - 0.01 and second >= rtt
        writer.close()
        assert proxy.cpu_seconds() > 0


async def test_window_and_bandwidth_bound_the_rate_and_bytes_stay_intact(echo_port: int) -> None:
    payload = os.urandom(3 << 20)
    window, rtt = 256 << 10, 0.05
    with DelayProxy("127.0.0.1", echo_port, rtt, window=window) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        seconds = await asyncio.wait_for(exchange(reader, writer, payload), 60)
        writer.close()
    assert seconds >= len(payload) / window * rtt  # at most one window per round trip
    bandwidth = 8 << 20
    with DelayProxy("127.0.0.1", echo_port, 0.0, bandwidth=bandwidth) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        seconds = await asyncio.wait_for(exchange(reader, writer, payload), 60)
        writer.close()
    assert seconds >= len(payload) / bandwidth
