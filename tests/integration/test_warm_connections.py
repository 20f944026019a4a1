"""Connections opened ahead (http11.ConnectionPool.warm, ObjectStore.warm) and the round trip
the pool measures, against a loopback server that counts its connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.integration.test_http11 import keep_answering, scripted


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_warm_opens_connections_that_later_requests_use() -> None:
    async with scripted(keep_answering, max_idle=8) as (server, pool):
        assert pool.warm(5) == 5
        assert pool.warm(5) == 0, "those being opened count"
        await wait_for(lambda: len(pool._idle) == 5)
        responses = await asyncio.gather(
            *(pool.request("GET", "/b/k", {"Host": "h"}) for _ in range(5))
        )
        for response in responses:
            response.release()
        assert server.connections == 5 and len(server.requests) == 5
        assert pool.warm(3) == 0, "5 exist already"
        assert pool.warm(20) == 3, "no more than max_idle"


async def test_warm_connections_are_closed_with_the_pool() -> None:
    async with scripted(keep_answering, max_idle=8) as (_server, pool):
        pool.warm(4)
        await pool.close()  # while they may still be opening
        assert not pool._warming and not pool._idle
        assert pool.warm(4) == 0


async def test_the_pool_measures_the_quickest_answer() -> None:
    async with scripted(keep_answering) as (_server, pool):
        assert pool.round_trip is None
        for _ in range(3):
            response = await pool.request("GET", "/b/k", {"Host": "h"})
            response.release()
        assert pool.round_trip is not None and 0 < pool.round_trip < 10
        response = await pool.request("PUT", "/b/k", {"Host": "h"}, b"x" * 10)
        response.release()  # a request with a body is not a sample (its body is in it)
